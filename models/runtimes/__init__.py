"""Model runtimes: one small protocol (load from a folder, describe inputs and outputs, forward
a batch) with one class per manifest `format` (seed, keras, onnx)."""

from __future__ import annotations

from pathlib import Path

from models.manifest import Manifest
from models.runtimes.base import Outputs, Runtime, Tensor

__all__ = ["Outputs", "Runtime", "Tensor", "load_runtime"]

DEVICES = ("cpu", "gpu")


def load_runtime(manifest: Manifest, path: Path, device: str = "cpu") -> Runtime:
    """The runtime of a manifest's format over its (sha256-verified) file, checked against
    the manifest: a ManifestError naming the file and field when they disagree."""
    if manifest.format == "keras":
        from models.runtimes.keras_file import KerasRuntime

        return KerasRuntime(manifest, path)
    if manifest.format == "onnx":
        from models.runtimes.onnx_file import OnnxRuntime

        return OnnxRuntime(manifest, path, device)
    from models.runtimes.seed import SeedRuntime

    return SeedRuntime(manifest, path)
