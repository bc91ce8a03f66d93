"""The site's models: every manifest under one directory, loaded once, picked per series."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from models.loaded import LoadedModel, load_model
from models.manifest import MANIFEST_NAMES, Manifest, ManifestError, load_manifest
from models.preprocess import read_header
from models.runtimes.seed import build_model

__all__ = ["Choice", "LoadedModel", "Registry", "SeriesInfo", "build_model", "load_model",
           "refusal", "scan_manifests"]


@dataclass(frozen=True)
class SeriesInfo:
    """What model selection needs to know about a series."""

    modality: str
    body_part: str
    sop_class_uid: str
    slices: int

    @classmethod
    def from_files(cls, paths: Sequence[Path]) -> SeriesInfo:
        """Describe a series from its files' headers; slices counts frames of multi-frames."""
        return cls.from_headers([read_header(Path(path)) for path in paths])

    @classmethod
    def from_headers(cls, headers: Sequence[Dataset]) -> SeriesInfo:
        """Describe a series from its files' headers, read once by a caller that needs them
        again (a series-level model reads the same headers to order its volume)."""
        if not headers:
            raise ValueError("a series needs at least one file")
        first = headers[0]
        return cls(
            modality=str(first.get("Modality", "")),
            body_part=str(first.get("BodyPartExamined", "")),
            sop_class_uid=str(first.get("SOPClassUID", "")),
            slices=sum(int(ds.get("NumberOfFrames") or 1) for ds in headers),
        )


@dataclass(frozen=True)
class Choice:
    """An image model (a CNN of any format) that applies to a series, and the LSTMs stacked on
    its embedding that also apply."""

    cnn: LoadedModel
    lstms: tuple[LoadedModel, ...] = ()


def _upper(values: list[str]) -> set[str]:
    """Case-insensitive comparison set for DICOM code strings."""
    return {value.upper() for value in values}


def refusal(manifest: Manifest, series: SeriesInfo) -> str | None:
    """The `[selection]` rule that keeps the model off the series (field, value and what the
    series has), None when it admits it: so an operator sees why a model did not run."""
    rules = manifest.selection
    if rules.modalities and series.modality.upper() not in _upper(rules.modalities):
        return f"selection.modalities = {rules.modalities} (series: {series.modality!r})"
    if rules.body_parts and series.body_part.upper() not in _upper(rules.body_parts):
        return f"selection.body_parts = {rules.body_parts} (series: {series.body_part!r})"
    if rules.sop_class_uids and series.sop_class_uid not in rules.sop_class_uids:
        return f"selection.sop_class_uids (series: {series.sop_class_uid})"
    if series.slices < rules.min_slices:
        return f"selection.min_slices = {rules.min_slices} (series: {series.slices})"
    if rules.max_slices is not None and series.slices > rules.max_slices:
        return f"selection.max_slices = {rules.max_slices} (series: {series.slices})"
    return None


def _matches(manifest: Manifest, series: SeriesInfo) -> bool:
    """Whether a manifest's selection rules admit a series (empty lists admit anything)."""
    return refusal(manifest, series) is None


def _model_folders(models_dir: Path) -> list[Path]:
    """Model folders: the directory itself if it holds a manifest, else its subfolders that do."""
    if any((models_dir / name).is_file() for name in MANIFEST_NAMES):
        return [models_dir]
    return sorted(
        child for child in models_dir.iterdir()
        if child.is_dir() and any((child / name).is_file() for name in MANIFEST_NAMES)
    )


def scan_manifests(models_dir: Path) -> list[tuple[Path, Manifest]]:
    """Every manifest one level under a directory, checked for unique names and LSTM links."""
    if not models_dir.is_dir():
        raise ManifestError(models_dir, "(directory)", "models directory does not exist")
    found = [(folder, load_manifest(folder)) for folder in _model_folders(models_dir)]
    by_name: dict[str, tuple[Path, Manifest]] = {}
    for folder, manifest in found:
        if manifest.name in by_name:
            raise ManifestError(
                folder, "name", f"{manifest.name!r} is also used by {by_name[manifest.name][0]}"
            )
        by_name[manifest.name] = (folder, manifest)
    for folder, manifest in found:
        if manifest.level == "embeddings":
            _check_link(folder, manifest, by_name)
    return found


def _check_link(folder: Path, lstm: Manifest, by_name: dict[str, tuple[Path, Manifest]]) -> None:
    """An LSTM must name an existing image model with an embedding of the width it reads (a
    keras or onnx model's width is known once its file is loaded: `_check_widths`)."""
    target = by_name.get(str(lstm.embedding_model))
    if target is None or target[1].level != "image":
        raise ManifestError(
            folder, "embedding_model", f"no cnn named {lstm.embedding_model!r} in the registry"
        )
    if target[1].format != "seed":
        if target[1].answers.embedding is None:
            raise ManifestError(folder, "embedding_model", f"{lstm.embedding_model!r} names "
                                "no [output] embedding for an LSTM to read")
        return
    if target[1].embedding_width != lstm.embedding_width:
        raise ManifestError(
            folder,
            "embedding_width",
            f"{lstm.embedding_width} differs from {lstm.embedding_model!r}'s "
            f"{target[1].embedding_width}",
        )


def _check_widths(cnns: Sequence[LoadedModel], lstms: Sequence[LoadedModel]) -> None:
    """Each LSTM reads an embedding as wide as its image model's file gives."""
    width = {cnn.name: cnn.embedding_width for cnn in cnns}
    for lstm in lstms:
        found = width[str(lstm.manifest.embedding_model)]
        if found != lstm.manifest.embedding_width:
            raise ManifestError(lstm.folder, "embedding_width",
                                f"{lstm.manifest.embedding_width} differs from "
                                f"{lstm.manifest.embedding_model!r}'s {found}")


@dataclass(frozen=True)
class Registry:
    """The loaded models of a site; build it once per worker process with `Registry.load`.

    `cnns` read one image at a time (any format), `lstms` a CNN's embeddings in slice order,
    `volumes` the whole series as one volume.
    """

    cnns: tuple[LoadedModel, ...]
    lstms: tuple[LoadedModel, ...]
    volumes: tuple[LoadedModel, ...] = ()

    @classmethod
    def load(cls, models_dir: Path, device: str = "cpu") -> Registry:
        """Validate every manifest, verify every model file, and load and try each once."""
        loaded = [load_model(folder, manifest, device)
                  for folder, manifest in scan_manifests(models_dir)]
        by_level = {level: tuple(m for m in loaded if m.manifest.level == level)
                    for level in ("image", "embeddings", "series")}
        _check_widths(by_level["image"], by_level["embeddings"])
        return cls(cnns=by_level["image"], lstms=by_level["embeddings"],
                   volumes=by_level["series"])

    @property
    def models(self) -> tuple[LoadedModel, ...]:
        """Every loaded model."""
        return (*self.cnns, *self.lstms, *self.volumes)

    def select(self, series: SeriesInfo) -> list[Choice]:
        """The CNNs whose rules admit the series, each with its admitted LSTMs."""
        return [
            Choice(
                cnn,
                tuple(
                    lstm for lstm in self.lstms
                    if lstm.manifest.embedding_model == cnn.name and _matches(lstm.manifest, series)
                ),
            )
            for cnn in self.cnns
            if _matches(cnn.manifest, series)
        ]

    def select_volumes(self, series: SeriesInfo) -> list[LoadedModel]:
        """The series-level models whose rules admit the series."""
        return [model for model in self.volumes if _matches(model.manifest, series)]
