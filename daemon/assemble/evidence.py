"""Whether a series holds everything its own images declare (completion from evidence).

Without MPPS, the images still say how many of them there are: Images in Acquisition,
Number of Temporal Positions (times the slices of each position), Number of Frames for an
enhanced multi-frame object, or InstanceNumber 1..N with slices evenly spaced along the
normal of their orientation. `series_verdict` applies the first rule the images carry
and answers COMPLETE, INCOMPLETE or UNCERTAIN; anything it cannot vouch for is
UNCERTAIN, and the study then waits for the quiet window as it always did.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

# Slices count as evenly spaced when each gap is within this of the median gap
# (the larger of an absolute and a relative tolerance: float text in DS values).
SPACING_TOLERANCE_MM = 0.01
SPACING_TOLERANCE = 0.01

# The only elements read from each file.
_TAGS = [
    tag_for_keyword(keyword)
    for keyword in (
        "InstanceNumber",
        "AcquisitionNumber",
        "ImagesInAcquisition",
        "NumberOfTemporalPositions",
        "TemporalPositionIdentifier",
        "NumberOfFrames",
        "ImagePositionPatient",
        "ImageOrientationPatient",
    )
]


class Verdict(enum.StrEnum):
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"
    UNCERTAIN = "uncertain"


@dataclasses.dataclass(frozen=True)
class ImageFacts:
    """What one instance declares about the series it belongs to (None: not stated)."""

    instance_number: int | None = None
    acquisition_number: int | None = None
    images_in_acquisition: int | None = None
    temporal_positions: int | None = None
    temporal_position: int | None = None
    frames: int | None = None
    position: tuple[float, float, float] | None = None
    orientation: tuple[float, ...] | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> ImageFacts:
        """The facts of a header; a value that is not a number counts as not stated."""
        return cls(
            instance_number=_int(ds, "InstanceNumber"),
            acquisition_number=_int(ds, "AcquisitionNumber"),
            images_in_acquisition=_int(ds, "ImagesInAcquisition"),
            temporal_positions=_int(ds, "NumberOfTemporalPositions"),
            temporal_position=_int(ds, "TemporalPositionIdentifier"),
            frames=_int(ds, "NumberOfFrames"),
            position=_floats(ds, "ImagePositionPatient", 3),  # type: ignore[arg-type]
            orientation=_floats(ds, "ImageOrientationPatient", 6),
        )


@dataclasses.dataclass(frozen=True)
class SeriesVerdict:
    """A series' verdict and the rule (or doubt) behind it, for the log."""

    verdict: Verdict
    why: str


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _floats(ds: Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    try:
        values = tuple(float(v) for v in (ds.get(keyword) or ()))
    except (TypeError, ValueError):
        return None
    return values if len(values) == n and all(map(math.isfinite, values)) else None


def read_facts(path: Path) -> ImageFacts | None:
    """The facts of a spooled file, or None when it cannot be read."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None
    return ImageFacts.from_dataset(ds)


def _common(values: Iterable[int | None]) -> int | None:
    """The one value every instance states, or None when one is missing or they differ."""
    seen = set(values)
    return seen.pop() if len(seen) == 1 and None not in seen else None


def _by_images_in_acquisition(facts: Sequence[ImageFacts]) -> SeriesVerdict:
    groups: dict[int | None, list[ImageFacts]] = {}
    for f in facts:
        groups.setdefault(f.acquisition_number, []).append(f)
    for number, members in groups.items():
        expected = _common(f.images_in_acquisition for f in members)
        if expected is None:
            return SeriesVerdict(Verdict.UNCERTAIN, "Images in Acquisition differs or is missing")
        if len(members) < expected:
            return SeriesVerdict(
                Verdict.INCOMPLETE,
                f"acquisition {number}: {len(members)} of {expected} images in acquisition",
            )
        if len(members) > expected:
            return SeriesVerdict(Verdict.UNCERTAIN, "more images than Images in Acquisition")
    return SeriesVerdict(Verdict.COMPLETE, "Images in Acquisition")


def _by_temporal_positions(facts: Sequence[ImageFacts], positions: int) -> SeriesVerdict:
    counts = Counter(f.temporal_position for f in facts)
    if None in counts or not set(counts) <= set(range(1, positions + 1)):
        return SeriesVerdict(
            Verdict.UNCERTAIN, "Temporal Position Identifier missing or out of range"
        )
    if len(counts) < positions or len(set(counts.values())) != 1:
        return SeriesVerdict(
            Verdict.INCOMPLETE, f"{len(counts)} of {positions} temporal positions, unevenly filled"
        )
    return SeriesVerdict(Verdict.COMPLETE, f"{positions} temporal positions x slices")


def _normal(orientation: tuple[float, ...]) -> tuple[float, float, float]:
    r, c = orientation[:3], orientation[3:]
    return (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])


def _evenly_spaced(facts: Sequence[ImageFacts]) -> bool:
    """All slices share one orientation and lie evenly spaced along its normal."""
    orientation = facts[0].orientation
    if orientation is None or any(
        f.orientation != orientation or f.position is None for f in facts
    ):
        return False
    normal = _normal(orientation)
    depths = sorted(
        sum(p * n for p, n in zip(f.position or (), normal, strict=True)) for f in facts
    )
    gaps = [b - a for a, b in zip(depths, depths[1:], strict=False)]
    step = sorted(gaps)[len(gaps) // 2]
    tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE * step)
    return step > SPACING_TOLERANCE_MM and all(abs(g - step) <= tolerance for g in gaps)


def _by_instance_numbers(facts: Sequence[ImageFacts]) -> SeriesVerdict:
    numbers = [f.instance_number for f in facts]
    if None in numbers:
        return SeriesVerdict(Verdict.UNCERTAIN, "an instance has no InstanceNumber")
    if sorted(numbers) != list(range(1, len(facts) + 1)):  # type: ignore[type-var]
        return SeriesVerdict(Verdict.UNCERTAIN, "InstanceNumber is not 1..N without gaps")
    if len(facts) < 2 or not _evenly_spaced(facts):
        return SeriesVerdict(Verdict.UNCERTAIN, "slices not evenly spaced along the normal")
    return SeriesVerdict(Verdict.COMPLETE, f"InstanceNumber 1..{len(facts)}, even spacing")


def series_verdict(facts: Sequence[ImageFacts | None]) -> SeriesVerdict:
    """Whether the instances of one series are all the series has, by its own evidence."""
    if not facts or any(f is None for f in facts):
        return SeriesVerdict(Verdict.UNCERTAIN, "an instance could not be read")
    known = [f for f in facts if f is not None]
    if all((f.frames or 1) > 1 for f in known):
        if len(known) == 1:
            return SeriesVerdict(Verdict.COMPLETE, f"one object of {known[0].frames} frames")
        return SeriesVerdict(Verdict.UNCERTAIN, "several multi-frame objects")
    if any(f.images_in_acquisition is not None for f in known):
        return _by_images_in_acquisition(known)
    positions = _common(f.temporal_positions for f in known)
    if positions is not None and positions > 1:
        return _by_temporal_positions(known, positions)
    return _by_instance_numbers(known)
