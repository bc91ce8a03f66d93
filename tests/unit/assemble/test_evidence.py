"""Completion from evidence: what each rule concludes from the images' own declarations."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from daemon.assemble.evidence import ImageFacts, Verdict, read_facts, series_verdict
from models.phantom import write_series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def slices(n: int, spacing: float = 2.5, **extra: int) -> list[ImageFacts]:
    return [
        ImageFacts(
            instance_number=i + 1, position=(0.0, 0.0, i * spacing), orientation=AXIAL, **extra
        )
        for i in range(n)
    ]


def test_contiguous_evenly_spaced_slices_are_complete() -> None:
    assert series_verdict(slices(20)).verdict == Verdict.COMPLETE


@pytest.mark.parametrize(
    "facts",
    [
        slices(20)[:5] + slices(20)[6:],  # a slice missing
        [*slices(3), ImageFacts(instance_number=4, position=(0, 0, 9.0), orientation=AXIAL)],
        [ImageFacts(instance_number=1)],  # one slice, nothing to measure
        [*slices(3), ImageFacts(position=(0, 0, 7.5), orientation=AXIAL)],  # no InstanceNumber
        [*slices(3), None],  # unreadable
    ],
    ids=["gap", "uneven", "single", "unnumbered", "unreadable"],
)
def test_doubt_is_uncertain(facts: list[ImageFacts | None]) -> None:
    assert series_verdict(facts).verdict == Verdict.UNCERTAIN


def test_oblique_slices_are_measured_along_their_normal() -> None:
    oblique = (1.0, 0.0, 0.0, 0.0, 0.8, -0.6)  # normal (0, 0.6, 0.8)
    facts = [
        ImageFacts(
            instance_number=i + 1, position=(5.0, 0.6 * 2 * i, 0.8 * 2 * i), orientation=oblique
        )
        for i in range(6)
    ]
    assert series_verdict(facts).verdict == Verdict.COMPLETE


def test_images_in_acquisition_decides_per_acquisition() -> None:
    full = slices(4, images_in_acquisition=4, acquisition_number=1)
    assert series_verdict(full).verdict == Verdict.COMPLETE
    assert series_verdict(full[:3]).verdict == Verdict.INCOMPLETE
    second = slices(2, images_in_acquisition=3, acquisition_number=2)
    assert series_verdict(full + second).verdict == Verdict.INCOMPLETE


def test_temporal_positions_times_slices() -> None:
    dynamic = [
        ImageFacts(instance_number=t * 3 + s + 1, temporal_positions=2, temporal_position=t + 1)
        for t in range(2)
        for s in range(3)
    ]
    assert series_verdict(dynamic).verdict == Verdict.COMPLETE
    assert series_verdict(dynamic[:4]).verdict == Verdict.INCOMPLETE


def test_one_multiframe_object_is_complete() -> None:
    assert series_verdict([ImageFacts(frames=120)]).verdict == Verdict.COMPLETE
    assert series_verdict([ImageFacts(frames=2), ImageFacts(frames=3)]).verdict == (
        Verdict.UNCERTAIN
    )


def test_facts_are_read_from_a_phantom_file(tmp_path: Path) -> None:
    paths = write_series(tmp_path, slices=3, rows=8, cols=8)
    facts = [read_facts(p) for p in paths]
    assert [f.instance_number for f in facts if f] == [1, 2, 3]
    assert series_verdict(facts).verdict == Verdict.COMPLETE
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    assert read_facts(tmp_path / "junk.dcm") is None


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_a_value_that_is_not_a_number_is_not_stated() -> None:
    ds = Dataset()
    ds[0x00200013] = RawDataElement(Tag(0x00200013), "IS", 2, b"x ", 0, False, True)
    ds.ImagePositionPatient = ["1", "2"]
    assert ImageFacts.from_dataset(ds) == ImageFacts()
