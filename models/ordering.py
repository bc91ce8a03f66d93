"""Slice order of a series: ImagePositionPatient along the normal of ImageOrientationPatient,
else InstanceNumber; gaps and duplicate positions are reported, never raised."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from models.preprocess import PreprocessError, read_header

DUPLICATE_TOLERANCE_MM = 0.01
GAP_TOLERANCE = 0.2  # a spacing more than 20% off the median is a gap


@dataclass(frozen=True)
class SliceRef:
    """One image row of a series: a single-frame instance, or one frame (1-based) of one."""

    path: Path
    sop_instance_uid: str
    frame: int | None
    position: float | None
    instance_number: int | None
    rows: int
    columns: int


@dataclass(frozen=True)
class Gap:
    """Two neighbouring slices further apart (or closer) than the series' median spacing."""

    before_uid: str
    after_uid: str
    spacing_mm: float
    expected_mm: float


@dataclass(frozen=True)
class OrderReport:
    """How a series was ordered and what looked wrong; reported, never raised."""

    method: str  # "position", "instance_number" or "as_given"
    spacing_mm: float | None
    gaps: tuple[Gap, ...] = ()
    duplicates: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        """True when nothing about the order needs a human's eye."""
        return not (self.gaps or self.duplicates or self.notes)


@dataclass(frozen=True)
class OrderedSeries:
    """A series' image rows in slice order, with the report of how that order was found."""

    slices: tuple[SliceRef, ...]
    report: OrderReport


def _vector(value: object) -> np.ndarray | None:
    """A DICOM multi-valued number as a float array, or None when absent or malformed."""
    if value is None:
        return None
    try:
        return np.asarray([float(item) for item in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None


def _normal(orientation: np.ndarray | None) -> np.ndarray | None:
    """Unit slice normal from ImageOrientationPatient (row x column direction cosines)."""
    if orientation is None or orientation.shape != (6,):
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    length = float(np.linalg.norm(normal))
    return normal / length if length > 1e-6 else None


def _frame_geometry(
    ds: Dataset, frames: int
) -> tuple[list[np.ndarray | None], np.ndarray | None]:
    """Per-frame positions and the orientation, from the classic or the enhanced (functional
    group) attributes."""
    orientation = _vector(ds.get("ImageOrientationPatient"))
    positions: list[np.ndarray | None] = [_vector(ds.get("ImagePositionPatient"))] * frames
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and orientation is None:
        plane = shared[0].get("PlaneOrientationSequence")
        orientation = _vector(plane[0].get("ImageOrientationPatient")) if plane else None
    if per_frame and len(per_frame) == frames:
        positions = []
        for item in per_frame:
            plane = item.get("PlanePositionSequence")
            positions.append(_vector(plane[0].get("ImagePositionPatient")) if plane else None)
            if orientation is None and item.get("PlaneOrientationSequence"):
                orientation = _vector(
                    item.PlaneOrientationSequence[0].get("ImageOrientationPatient")
                )
    return positions, orientation


@dataclass(frozen=True)
class FileGeometry:
    """What one file contributes to the order: its rows, orientation and per-frame positions."""

    refs: tuple[SliceRef, ...]
    orientation: np.ndarray | None
    positions: tuple[np.ndarray | None, ...]


def file_refs(path: Path, sop_instance_uid: str, instance_number: int | None, rows: int,
              columns: int, frames: int, multiframe: bool) -> tuple[SliceRef, ...]:
    """One file's image rows, not yet placed along the slice axis: one per frame, each
    numbered (1-based) when the file is a multi-frame object."""
    return tuple(
        SliceRef(
            path=path,
            sop_instance_uid=sop_instance_uid,
            frame=index + 1 if multiframe else None,
            position=None,
            instance_number=instance_number,
            rows=rows,
            columns=columns,
        )
        for index in range(frames)
    )


def geometry_of(path: Path, ds: Dataset) -> FileGeometry:
    """The image rows one file (header or full dataset) contributes, with its geometry."""
    frames = int(ds.get("NumberOfFrames") or 1)
    positions, orientation = _frame_geometry(ds, frames)
    number = ds.get("InstanceNumber")
    refs = file_refs(
        path,
        str(ds.get("SOPInstanceUID", "")),
        int(number) if number not in (None, "") else None,
        int(ds.get("Rows", 0)),
        int(ds.get("Columns", 0)),
        frames,
        "NumberOfFrames" in ds,
    )
    return FileGeometry(refs, orientation, tuple(positions))


def _position_report(ordered: list[SliceRef]) -> OrderReport:
    """Gaps and duplicates along the slice normal of position-ordered rows."""
    positions = np.asarray([ref.position for ref in ordered], dtype=np.float64)
    steps = np.diff(positions)
    duplicates = tuple(
        (ordered[i].sop_instance_uid, ordered[i + 1].sop_instance_uid)
        for i in np.flatnonzero(np.abs(steps) < DUPLICATE_TOLERANCE_MM)
    )
    moving = steps[np.abs(steps) >= DUPLICATE_TOLERANCE_MM]
    if moving.size == 0:
        return OrderReport("position", None, duplicates=duplicates)
    median = float(np.median(moving))
    gaps = tuple(
        Gap(ordered[i].sop_instance_uid, ordered[i + 1].sop_instance_uid, float(step), median)
        for i, step in enumerate(steps)
        if abs(step) >= DUPLICATE_TOLERANCE_MM and abs(step - median) > GAP_TOLERANCE * median
    )
    return OrderReport("position", median, gaps=gaps, duplicates=duplicates)


def _check_sizes(refs: list[SliceRef]) -> None:
    """Refuse a series whose images differ in size (for models that read the whole series)."""
    first = refs[0]
    for ref in refs:
        if (ref.rows, ref.columns) != (first.rows, first.columns):
            raise PreprocessError(
                ref.path,
                f"image size {ref.rows}x{ref.columns} differs from the series' "
                f"{first.rows}x{first.columns}",
            )


def _projected(files: Sequence[FileGeometry], notes: list[str]) -> list[SliceRef]:
    """Every row, with its position along the series' slice normal where geometry allows."""
    normal = None
    refs: list[SliceRef] = []
    for geometry in files:
        file_normal = _normal(geometry.orientation)
        if normal is None:
            normal = file_normal
        elif file_normal is not None and abs(float(np.dot(normal, file_normal))) < 0.999:
            notes.append(f"{geometry.refs[0].path}: orientation differs from the first image's")
        for ref, point in zip(geometry.refs, geometry.positions, strict=True):
            known = normal is not None and point is not None and point.shape == (3,)
            refs.append(replace(ref, position=float(np.dot(point, normal))) if known else ref)
    return refs


def arrange(files: Sequence[FileGeometry], *, uniform_size: bool = False) -> OrderedSeries:
    """Order rows along the patient axis, falling back to InstanceNumber, then to the order
    given; ties break on SOP Instance UID so the result never depends on the input order."""
    notes: list[str] = []
    refs = _projected(files, notes)
    if uniform_size and refs:
        _check_sizes(refs)
    if refs and all(ref.position is not None for ref in refs):
        ordered = sorted(refs, key=lambda r: (r.position, r.instance_number or 0, r.frame or 0,
                                              r.sop_instance_uid))
        report = _position_report(ordered)
        return OrderedSeries(tuple(ordered), replace(report, notes=tuple(notes)))
    if refs and all(ref.instance_number is not None for ref in refs):
        ordered = sorted(refs, key=lambda r: (r.instance_number, r.frame or 0,
                                              r.sop_instance_uid))
        return OrderedSeries(tuple(ordered), OrderReport("instance_number", None,
                                                         notes=tuple(notes)))
    notes.append("no ImagePositionPatient or InstanceNumber on every image: order as given")
    return OrderedSeries(tuple(refs), OrderReport("as_given", None, notes=tuple(notes)))


def order_slices(paths: Sequence[Path], *, uniform_size: bool = False) -> OrderedSeries:
    """Order a series' files (headers only) along the patient axis; see `arrange`."""
    return arrange([geometry_of(Path(p), read_header(Path(p))) for p in paths],
                   uniform_size=uniform_size)
