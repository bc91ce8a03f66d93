"""A whole series as one volume for a series-level (3D) model: the slices in patient-axis
order, resampled linearly along the slice axis at their real positions (uneven spacing and
gaps included) to a fixed depth or a spacing in mm, then the model's input batch of one."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from models.loaded import LoadedModel
from models.manifest import Intensity, Manifest, ModelInput
from models.ordering import (
    DUPLICATE_TOLERANCE_MM,
    OrderedSeries,
    OrderReport,
    SliceRef,
    arrange,
    geometry_of,
)
from models.preprocess import PreprocessError, decode_dataset, read_deferred, volume_batch

MIN_SLICES = 3  # fewer distinct positions make no volume worth a 3D model's answer


@dataclass(frozen=True)
class VolumeTiming:
    """Where the seconds went (wall time): reading the headers and decoding the slices used,
    resampling, and the forward pass."""

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


def _brackets(positions: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each target, the index of the real slice below it and its weight towards the next
    one (positions increasing; targets beyond the ends lean on the two outermost slices)."""
    upper = np.clip(np.searchsorted(positions, targets, side="right"), 1, len(positions) - 1)
    lower = upper - 1
    span = positions[upper] - positions[lower]
    weight = np.clip((targets - positions[lower]) / span, 0.0, 1.0).astype(np.float32)
    return lower, weight


def resample(stack: np.ndarray, positions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Slices at `targets`, each interpolated linearly between the two real slices around it
    (positions increasing), so uneven spacing and gaps count by their millimetres."""
    lower, weight = _brackets(positions, targets)
    weight = weight.reshape(-1, *([1] * (stack.ndim - 1)))
    return stack[lower] * (1 - weight) + stack[lower + 1] * weight


def fit_depth(stack: np.ndarray, depth: int) -> np.ndarray:
    """The middle `depth` slices, or the stack padded evenly with zeros to `depth`."""
    extra = len(stack) - depth
    if extra >= 0:
        return stack[extra // 2: extra // 2 + depth]
    before = -extra // 2
    padding = [(before, -extra - before)] + [(0, 0)] * (stack.ndim - 1)
    return np.pad(stack, padding)


def _targets(positions: np.ndarray, spec: ModelInput) -> np.ndarray:
    """Where the volume's slices are made: `target_positions`, cut to the model's depth as
    `fit_depth` would cut the slices made there (a shorter list is padded after resampling)."""
    targets = target_positions(positions, spec)
    return fit_depth(targets, spec.shape[0]) if len(targets) > spec.shape[0] else targets


def _used(positions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The real slices (indices, increasing) that the targets interpolate between: the only
    ones worth decoding. Resampling from these alone gives the same volume, since each
    target's two neighbours are kept and nothing lay between them."""
    lower, _ = _brackets(positions, targets)
    return np.unique(np.concatenate([lower, lower + 1]))


def _groups(positions: np.ndarray) -> np.ndarray:
    """Where each run of rows at one position (duplicates) starts, and the end: rows
    `bounds[g]:bounds[g + 1]` make slice g."""
    starts = np.flatnonzero(np.diff(positions, prepend=-np.inf) >= DUPLICATE_TOLERANCE_MM)
    return np.append(starts, len(positions))


def _positions(ordered: OrderedSeries, spec: ModelInput) -> np.ndarray:
    """Each row's place along the slice axis, in mm where the geometry says (else its rank)."""
    rows = ordered.slices
    if ordered.report.method == "position":
        return np.array([ref.position for ref in rows], dtype=np.float64)
    if spec.spacing_mm is not None:
        raise PreprocessError(rows[0].path, "input.spacing_mm needs ImagePositionPatient and "
                              "ImageOrientationPatient on every slice")
    return np.arange(len(rows), dtype=np.float64)  # evenly spaced, by number


def _decode(headers: dict[Path, Dataset], paths: Sequence[Path], intensity: Intensity,
            target: Sequence[int], workers: int) -> dict[Path, list[np.ndarray]]:
    """The frames of each file named (each read once), on reader threads."""

    def one(path: Path) -> list[np.ndarray]:
        try:
            return decode_dataset(path, headers[path], intensity, target)
        except OSError as error:  # the deferred pixel data: the file changed or went away
            raise PreprocessError(path, f"pixel data cannot be read ({error})") from error

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dicom-reader") as pool:
        return dict(zip(paths, pool.map(one, paths), strict=True))


def _slice(decoded: dict[Path, list[np.ndarray]], refs: Sequence[SliceRef]) -> np.ndarray:
    """The frame of rows at one position: one row's own, or the mean of duplicates'."""
    frames = [decoded[ref.path][(ref.frame or 1) - 1] for ref in refs]
    return frames[0] if len(frames) == 1 else np.mean(frames, axis=0)


def _zscored(stack: np.ndarray, every: np.ndarray) -> np.ndarray:
    """`stack` less the mean of `every` slice of the series, over their standard deviation."""
    std = float(every.std())
    return (stack - np.float32(every.mean())) / np.float32(std if std > 0 else 1.0)


def read_volume(paths: Sequence[Path], model: LoadedModel, workers: int = 2,
                headers: Mapping[Path, Dataset] | None = None) -> Volume:
    """A series as a series-level model's input batch of one; a PreprocessError naming a file
    when the series cannot be one volume (sizes differ, too few slices, no positions for a
    spacing). Every header is read (unless given: `read_deferred`'s, pixel data left in the
    file), but only the slices the resampling uses are decoded."""
    spec = model.manifest.reads
    measured = spec.normalisation == "zscore" and spec.mean is None
    intensity = Intensity(normalisation="none") if measured else spec.intensity
    start = time.perf_counter()
    given = headers or {}
    headers = {
        path: given[path] if path in given else read_deferred(path)
        for path in dict.fromkeys(Path(p) for p in paths)
    }
    ordered = arrange([geometry_of(path, ds) for path, ds in headers.items()],
                      uniform_size=True)
    rows = ordered.slices
    if not rows:
        raise PreprocessError(Path(paths[0]), "the series has no image to make a volume of")
    positions = _positions(ordered, spec)
    bounds = _groups(positions)
    distinct = positions[bounds[:-1]]
    if len(distinct) < MIN_SLICES:
        raise PreprocessError(rows[0].path, f"a volume needs at least {MIN_SLICES} slices at "
                              f"distinct positions; the series has {len(distinct)}")
    targets = _targets(distinct, spec)
    # A measured zscore takes its mean and spread from every slice, so all are decoded.
    used = np.arange(len(distinct)) if measured else _used(distinct, targets)
    needed = [ref for g in used for ref in rows[bounds[g]:bounds[g + 1]]]
    decoded = _decode(headers, list(dict.fromkeys(ref.path for ref in needed)), intensity,
                      spec.shape[1:], workers)
    decode_s = time.perf_counter() - start
    tick = time.perf_counter()
    stack = np.stack([_slice(decoded, rows[bounds[g]:bounds[g + 1]]) for g in used])
    if measured:
        stack = _zscored(stack, np.stack([_slice(decoded, (ref,)) for ref in rows]))
    volume = fit_depth(resample(stack, distinct[used], targets), spec.shape[0])
    batch = np.asarray(volume_batch(volume, spec))
    return Volume(batch, rows, ordered.report, decode_s, time.perf_counter() - tick)


def infer_volume(paths: Sequence[Path], model: LoadedModel, *, workers: int = 2,
                 headers: Mapping[Path, Dataset] | None = None) -> VolumeResult:
    """A series-level model's probabilities for one series (see `read_volume`)."""
    start = time.perf_counter()
    volume = read_volume(paths, model, workers, headers)
    tick = time.perf_counter()
    probabilities, _ = model.predict(volume.batch)
    forward_s = time.perf_counter() - tick
    timing = VolumeTiming(time.perf_counter() - start, volume.decode_s, volume.resample_s,
                          forward_s)
    return VolumeResult(model.manifest, volume.rows, probabilities[0], volume.ordering, timing)
