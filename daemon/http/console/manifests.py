"""The models the workers load, as their manifests describe them (read without TensorFlow).

The Overview lists every model folder under `[models] dir` with its name, version,
format, what it reads, what runs it, and clinical-use marking, or the problem its manifest
has; manifests are read again only when a file changes. (Which runtime version ran a
result, the study page says from the result itself.)
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

from models.manifest import MANIFEST_NAMES, Manifest, ManifestError, load_manifest


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One model folder as the Overview shows it (`problem` set when its manifest is bad)."""

    folder: str
    name: str
    version: str = ""
    format: str = ""  # seed, keras or onnx (models.manifest.Manifest.format)
    level: str = ""  # what one prediction reads: image, series or embeddings
    runtime: str = ""  # what the workers run it with
    clinical_use: bool = False
    shadow: bool = False
    heatmaps: bool = False
    intended_use: str = ""
    problem: str | None = None


def runtime(manifest: Manifest, device: str) -> str:
    """What a worker runs the model with (models.runtimes.load_runtime picks it by format)."""
    if manifest.format == "onnx":
        opset = f", opset {manifest.opset}" if manifest.opset else ""
        return f"onnxruntime on {device}{opset}"
    return "TensorFlow"


def _entry(folder: Path, shadow: frozenset[str], device: str) -> ModelEntry:
    try:
        manifest = load_manifest(folder)
    except ManifestError as exc:
        return ModelEntry(str(folder), folder.name, problem=str(exc))
    return ModelEntry(
        folder=str(folder),
        name=manifest.name,
        version=manifest.version,
        format=manifest.format,
        level=manifest.level,
        runtime=runtime(manifest, device),
        clinical_use=manifest.clinical_use,
        shadow=manifest.shadow or manifest.name in shadow,
        heatmaps=manifest.heatmaps,
        intended_use=manifest.intended_use,
    )


class ModelShelf:
    """The manifests under a directory, cached by their files' modification times."""

    def __init__(self, directory: Path, shadow: frozenset[str], device: str) -> None:
        self._directory = directory
        self._shadow = shadow
        self._device = device
        self._lock = threading.Lock()
        self._stamp: tuple[tuple[str, int], ...] | None = None
        self._entries: list[ModelEntry] = []

    def _manifests(self) -> list[Path]:
        if not self._directory.is_dir():
            return []
        folders = [self._directory, *sorted(p for p in self._directory.iterdir() if p.is_dir())]
        return [f / name for f in folders for name in MANIFEST_NAMES if (f / name).is_file()]

    def entries(self) -> list[ModelEntry]:
        """Every model folder, read again when a manifest was added, removed or changed."""
        files = self._manifests()
        stamp = tuple((str(p), p.stat().st_mtime_ns) for p in files)
        with self._lock:
            if stamp != self._stamp:
                folders = dict.fromkeys(p.parent for p in files)
                self._entries = [_entry(folder, self._shadow, self._device) for folder in folders]
                self._stamp = stamp
            return list(self._entries)
