"""A whole series as one volume for a series-level (3D) model: the slices in patient-axis
order, resampled linearly along the slice axis at their real positions (uneven spacing and
gaps included) to a fixed depth or a spacing in mm, then the model's input batch of one."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.loaded import LoadedModel
from models.manifest import Intensity, Manifest, ModelInput
from models.ordering import (
    DUPLICATE_TOLERANCE_MM,
    FileGeometry,
    OrderReport,
    SliceRef,
    arrange,
    geometry_of,
)
from models.preprocess import PreprocessError, decode_dataset, read_dataset, volume_batch

MIN_SLICES = 3  # fewer distinct positions make no volume worth a 3D model's answer


@dataclass(frozen=True)
class VolumeTiming:
    """Where the seconds went: reading and decoding (summed over reader threads), resampling
    and the forward pass (wall time)."""

    total_s: float
    decode_s: float
    resample_s: float
    forward_s: float


@dataclass(frozen=True)
class VolumeResult:
    """A series-level model's class probabilities for one series, from these slices."""

    model: Manifest
    rows: tuple[SliceRef, ...]
    probabilities: np.ndarray  # (classes,), float32
    ordering: OrderReport
    timing: VolumeTiming


@dataclass(frozen=True)
class Volume:
    """A series' slices as one model input, and the slices it was made from, in order."""

    batch: np.ndarray
    rows: tuple[SliceRef, ...]
    ordering: OrderReport
    decode_s: float
    resample_s: float


def target_positions(positions: np.ndarray, spec: ModelInput) -> np.ndarray:
    """Where the volume's slices lie along the slice axis: `depth` evenly from the first to the
    last slice, or every `spacing_mm` from the first."""
    first, last = float(positions[0]), float(positions[-1])
    if spec.spacing_mm is None:
        return np.linspace(first, last, spec.shape[0])
    count = int(np.floor((last - first) / spec.spacing_mm + 1e-6)) + 1
    return first + spec.spacing_mm * np.arange(count)


def resample(stack: np.ndarray, positions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Slices at `targets`, each interpolated linearly between the two real slices around it
    (positions increasing), so uneven spacing and gaps count by their millimetres."""
    upper = np.clip(np.searchsorted(positions, targets, side="right"), 1, len(positions) - 1)
    lower = upper - 1
    span = positions[upper] - positions[lower]
    weight = np.clip((targets - positions[lower]) / span, 0.0, 1.0).astype(np.float32)
    weight = weight.reshape(-1, *([1] * (stack.ndim - 1)))
    return stack[lower] * (1 - weight) + stack[upper] * weight


def fit_depth(stack: np.ndarray, depth: int) -> np.ndarray:
    """The middle `depth` slices, or the stack padded evenly with zeros to `depth`."""
    extra = len(stack) - depth
    if extra >= 0:
        return stack[extra // 2: extra // 2 + depth]
    before = -extra // 2
    padding = [(before, -extra - before)] + [(0, 0)] * (stack.ndim - 1)
    return np.pad(stack, padding)


def _merged(stack: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slices at the same position (duplicates) averaged into one, positions increasing."""
    starts = np.flatnonzero(np.diff(positions, prepend=-np.inf) >= DUPLICATE_TOLERANCE_MM)
    if len(starts) == len(positions):
        return stack, positions  # no duplicates: nothing to average (or to copy)
    counts = np.diff(np.append(starts, len(positions)))
    sums = np.add.reduceat(stack, starts, axis=0)
    return sums / counts.reshape(-1, *([1] * (stack.ndim - 1))), positions[starts]


@dataclass(frozen=True)
class _File:
    """One file read on a reader thread: its geometry, its decoded frames, the seconds."""

    geometry: FileGeometry
    frames: list[np.ndarray]
    seconds: float


def _decode(paths: Sequence[Path], intensity: Intensity, target: Sequence[int], workers: int
            ) -> list[_File]:
    """Every file read and decoded (each once), on reader threads, in the order given."""

    def one(path: Path) -> _File:
        start = time.perf_counter()
        ds = read_dataset(path)
        frames = decode_dataset(path, ds, intensity, target)
        return _File(geometry_of(path, ds), frames, time.perf_counter() - start)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dicom-reader") as pool:
        return list(pool.map(one, list(dict.fromkeys(Path(p) for p in paths))))


def read_volume(paths: Sequence[Path], model: LoadedModel, workers: int = 2) -> Volume:
    """A series as a series-level model's input batch of one; a PreprocessError naming a file
    when the series cannot be one volume (sizes differ, too few slices, no positions for a
    spacing)."""
    spec = model.manifest.reads
    measured = spec.normalisation == "zscore" and spec.mean is None
    intensity = Intensity(normalisation="none") if measured else spec.intensity
    files = _decode(paths, intensity, spec.shape[1:], workers)
    start = time.perf_counter()
    frames = {(ref.path, ref.frame): frame for item in files
              for ref, frame in zip(item.geometry.refs, item.frames, strict=True)}
    ordered = arrange([item.geometry for item in files], uniform_size=True)
    rows = ordered.slices
    if not rows:
        raise PreprocessError(Path(paths[0]), "the series has no image to make a volume of")
    stack = np.stack([frames[(ref.path, ref.frame)] for ref in rows])
    if measured:
        std = float(stack.std())
        stack = (stack - np.float32(stack.mean())) / np.float32(std if std > 0 else 1.0)
    if ordered.report.method == "position":
        positions = np.array([ref.position for ref in rows], dtype=np.float64)
    elif spec.spacing_mm is not None:
        raise PreprocessError(rows[0].path, "input.spacing_mm needs ImagePositionPatient and "
                              "ImageOrientationPatient on every slice")
    else:
        positions = np.arange(len(rows), dtype=np.float64)  # evenly spaced, by number
    stack, positions = _merged(stack, positions)
    if len(positions) < MIN_SLICES:
        raise PreprocessError(rows[0].path, f"a volume needs at least {MIN_SLICES} slices at "
                              f"distinct positions; the series has {len(positions)}")
    volume = fit_depth(resample(stack, positions, target_positions(positions, spec)),
                       spec.shape[0])
    batch = np.asarray(volume_batch(volume, spec))
    return Volume(batch, rows, ordered.report, sum(item.seconds for item in files),
                  time.perf_counter() - start)


def infer_volume(paths: Sequence[Path], model: LoadedModel, *, workers: int = 2
                 ) -> VolumeResult:
    """A series-level model's probabilities for one series (see `read_volume`)."""
    start = time.perf_counter()
    volume = read_volume(paths, model, workers)
    tick = time.perf_counter()
    probabilities, _ = model.predict(volume.batch)
    forward_s = time.perf_counter() - tick
    timing = VolumeTiming(time.perf_counter() - start, volume.decode_s, volume.resample_s,
                          forward_s)
    return VolumeResult(model.manifest, volume.rows, probabilities[0], volume.ordering, timing)
