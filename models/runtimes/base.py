"""What every runtime offers, and the checks of a model file against its manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from models.manifest import Manifest, ManifestError, ModelInput

# Where each dimension of an input sits, per layout (after the batch dimension).
_AXES = {
    "NHWC": ("rows", "columns", "channels"),
    "NCHW": ("channels", "rows", "columns"),
    "NDHWC": ("depth", "rows", "columns", "channels"),
    "NCDHW": ("channels", "depth", "rows", "columns"),
}


class ForwardError(ValueError):
    """The runtime failed on an input it had accepted at load (the series gets an error row)."""


@dataclass(frozen=True)
class Tensor:
    """An input or output as the model file declares it (None: a dynamic dimension)."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def __str__(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name!r} ({dims}) {self.dtype}"


@dataclass(frozen=True)
class Outputs:
    """A forward pass: the model's raw class outputs (batch, classes), and its embedding
    (batch, width) when it has one."""

    scores: np.ndarray
    embedding: np.ndarray | None


class Runtime(Protocol):
    """A loaded model file: its format, the runtime and version that run it (as the SR names
    them), the tensor it reads, the class output and embedding it answers, a forward pass."""

    format: str
    version: str
    input: Tensor
    output: Tensor
    embedding: Tensor | None

    def forward(self, batch: np.ndarray) -> Outputs:
        """Run a ready batch (the model's layout and dtype)."""
        ...


def item_shape(spec: ModelInput) -> tuple[int, ...]:
    """One input item's shape in the layout's order (no batch dimension)."""
    sizes = dict(zip(("depth", "rows", "columns") if spec.level == "series"
                     else ("rows", "columns"), spec.shape, strict=True), channels=spec.channels)
    return tuple(sizes[axis] for axis in _AXES[spec.layout])


def pick(path: Path, field: str, wanted: str | None, names: list[str], what: str) -> str:
    """The tensor named by a manifest field, or the only one; else one line listing them."""
    if wanted is None:
        if len(names) == 1:
            return names[0]
        raise ManifestError(path, field, f"the model has {len(names)} {what}s "
                            f"({', '.join(names)}): name the one to use")
    if wanted not in names:
        raise ManifestError(path, field, f"no {what} named {wanted!r}; the model has "
                            f"{', '.join(names) or 'none'}")
    return wanted


_OTHER_LAYOUT = {"NHWC": "NCHW", "NCHW": "NHWC", "NDHWC": "NCDHW", "NCDHW": "NDHWC"}


def _fits(tensor: Tensor, wanted: tuple[int, ...]) -> bool:
    """Whether every static dimension of an input (past the batch) is the one wanted."""
    return all(size is None or size == expected
               for size, expected in zip(tensor.shape[1:], wanted, strict=True))


def check_input(path: Path, spec: ModelInput, tensor: Tensor) -> None:
    """The file's input agrees with `[input]`: rank for the layout, batch, sizes, channels,
    dtype; a dynamic dimension accepts any size."""
    axes = _AXES[spec.layout]
    if len(tensor.shape) != len(axes) + 1:
        raise ManifestError(path, "input.layout", f"the model's input {tensor} has rank "
                            f"{len(tensor.shape)}; layout {spec.layout} needs rank "
                            f"{len(axes) + 1}")
    if tensor.shape[0] not in (None, 1):
        raise ManifestError(path, "input", f"the model's input {tensor} has a fixed batch of "
                            f"{tensor.shape[0]}; pacs-ai feeds a dynamic batch or one at a time")
    wanted = item_shape(spec)
    other = _OTHER_LAYOUT[spec.layout]
    if not _fits(tensor, wanted) and _fits(tensor, item_shape(spec.model_copy(
            update={"layout": other}))):
        raise ManifestError(path, "input.layout", f"the model's input {tensor} reads "
                            f"{other}, not {spec.layout}")
    for axis, size, expected in zip(axes, tensor.shape[1:], wanted, strict=True):
        if size is not None and size != expected:
            field = "input.channels" if axis == "channels" else "input.shape"
            raise ManifestError(path, field, f"the model's input {tensor} has {size} "
                                f"{axis} where [input] ({spec.layout}) says {expected}")
    if tensor.dtype != spec.dtype:
        raise ManifestError(path, "input.dtype", f"the model's input {tensor} is "
                            f"{tensor.dtype}, not {spec.dtype}")


def check_output(path: Path, manifest: Manifest, tensor: Tensor, embedding: Tensor | None
                 ) -> None:
    """The class output is (batch, classes) with as many classes as the manifest lists, and
    an embedding is (batch, width)."""
    if len(tensor.shape) != 2:
        raise ManifestError(path, "output.name", f"the model's output {tensor} is not "
                            "(batch, classes)")
    width = tensor.shape[1]
    if width is not None and width != len(manifest.classes):
        raise ManifestError(path, "classes", f"{len(manifest.classes)} classes listed but "
                            f"the model's output {tensor} gives {width}")
    if embedding is not None and (len(embedding.shape) != 2 or embedding.shape[1] is None):
        raise ManifestError(path, "output.embedding", f"the embedding {embedding} is not "
                            "(batch, width)")
