"""MPPS messages read as values, and the refusals Annex F names for what breaks its rules."""

from __future__ import annotations

import copy

import pytest
from pydicom.uid import generate_uid

from daemon.dicom.commitment import MAX_REFERENCES
from daemon.dicom.mpps import MalformedStep, read_create, read_set
from daemon.dicom.status import (
    INVALID_ATTRIBUTE_VALUE,
    MISSING_ATTRIBUTE,
    RESOURCE_LIMITATION,
)
from tests.modality import mpps_create_attributes, mpps_set_attributes

CT = "1.2.840.10008.5.1.4.1.1.2"


def test_create_names_its_study_and_starts_in_progress() -> None:
    study = generate_uid()
    created = read_create("1.2.3", mpps_create_attributes(study))
    assert (created.study_uid, created.state, created.performed.series) == (
        study,
        "IN PROGRESS",
        (),
    )


def test_create_of_grouped_procedures_names_every_scheduled_study_once() -> None:
    first, second = generate_uid(), generate_uid()
    attributes = mpps_create_attributes(first)
    item = copy.deepcopy(attributes.ScheduledStepAttributesSequence[0])
    item.StudyInstanceUID = second
    attributes.ScheduledStepAttributesSequence.extend([item, item])
    assert read_create("1.2.3", attributes).studies == (first, second)


def test_set_reads_series_images_and_discontinuation_reason() -> None:
    series = {"1.2.5": [(CT, "1.2.5.1"), (CT, "1.2.5.2")], "1.2.6": []}
    change = read_set(mpps_set_attributes("DISCONTINUED", series, discontinued_reason="Failure"))
    assert change.state == "DISCONTINUED" and change.discontinued_reason == "Failure"
    assert change.performed is not None
    assert change.performed.series == ("1.2.5", "1.2.6")
    assert [i.sop_instance_uid for i in change.performed.instances] == ["1.2.5.1", "1.2.5.2"]


@pytest.mark.parametrize(
    ("series", "status"),
    [
        ({"1.2.5": [(CT, f"1.2.5.{i}") for i in range(MAX_REFERENCES + 1)]}, RESOURCE_LIMITATION),
        ({"1.2.5": [(CT, "1.2." + "3" * 62)]}, INVALID_ATTRIBUTE_VALUE),
    ],
    ids=["too-many-images", "bad-uid"],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_set_refusals(series: dict[str, list[tuple[str, str]]], status: int) -> None:
    with pytest.raises(MalformedStep) as refused:
        read_set(mpps_set_attributes("COMPLETED", series))
    assert refused.value.status == status


def test_state_outside_annex_f_and_missing_list_are_refused() -> None:
    bad = mpps_set_attributes("COMPLETED", {})
    bad.PerformedProcedureStepStatus = "DONE"
    with pytest.raises(MalformedStep) as refused:
        read_set(bad)
    assert refused.value.status == INVALID_ATTRIBUTE_VALUE
    with pytest.raises(MalformedStep) as missing:
        read_create("1.2.3", None)
    assert missing.value.status == MISSING_ATTRIBUTE
