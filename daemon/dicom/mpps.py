"""Modality Performed Procedure Step (PS3.4 Annex F): N-CREATE and N-SET read as values.

A modality opens a step with N-CREATE (status IN PROGRESS) and ends it with an N-SET to
COMPLETED or DISCONTINUED, naming in the Performed Series Sequence the images it made.
The rules Annex F gives the SCP are checked here, each refusal carrying the status the
standard names for it, so the receiver (daemon.receive.mpps) only maps values to rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from pynetdicom.sop_class import ModalityPerformedProcedureStep

from daemon.dicom.commitment import MAX_REFERENCES, is_uid
from daemon.dicom.status import (
    INVALID_ATTRIBUTE_VALUE,
    MISSING_ATTRIBUTE,
    MISSING_ATTRIBUTE_VALUE,
    RESOURCE_LIMITATION,
    Refusal,
)

MPPS_SOP_CLASS = str(ModalityPerformedProcedureStep)

IN_PROGRESS = "IN PROGRESS"
COMPLETED = "COMPLETED"
DISCONTINUED = "DISCONTINUED"
STATES = (IN_PROGRESS, COMPLETED, DISCONTINUED)
FINAL_STATES = (COMPLETED, DISCONTINUED)

# Type 1 attributes of the N-CREATE (PS3.4 Table F.7.2-1) that need no more than a value.
CREATE_REQUIRED = (
    "PerformedProcedureStepID",
    "PerformedStationAETitle",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "PerformedProcedureStepStatus",
    "Modality",
)
T = TypeVar("T")


class MalformedStep(Refusal):
    """An N-CREATE or N-SET that Annex F refuses; `status` is the answer it names."""


@dataclasses.dataclass(frozen=True)
class PerformedImage:
    """One instance the step made: its series, SOP class and SOP instance."""

    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str


@dataclasses.dataclass(frozen=True)
class Performed:
    """The Performed Series Sequence: its series (some may hold nothing) and their instances."""

    series: tuple[str, ...] = ()
    instances: tuple[PerformedImage, ...] = ()

    def as_json(self) -> dict[str, list[Any]]:
        """The form the database keeps (daemon.db.schema.MppsStep.performed)."""
        return {
            "series": list(self.series),
            "instances": [list(dataclasses.astuple(i)) for i in self.instances],
        }


@dataclasses.dataclass(frozen=True)
class StepCreated:
    """What an N-CREATE told us: the step, the studies it was scheduled for (one per item of
    its Scheduled Step Attributes Sequence, several for grouped procedures), its status,
    what it made so far."""

    sop_instance_uid: str
    studies: tuple[str, ...]
    state: str
    performed: Performed

    @property
    def study_uid(self) -> str:
        """The study named first: the one logs and the console show for the step."""
        return self.studies[0]


@dataclasses.dataclass(frozen=True)
class StepSet:
    """What an N-SET changes; None where its modification list leaves a value as it was."""

    state: str | None
    performed: Performed | None
    discontinued_reason: str | None


def _value(info: Dataset, keyword: str) -> str:
    """The attribute's text, MalformedStep when it is absent (0x0120) or empty (0x0121)."""
    if keyword not in info:
        raise MalformedStep(f"{keyword} is missing", MISSING_ATTRIBUTE)
    value = info.get(keyword)
    text = "" if value is None else str(value).strip()
    if not text:
        raise MalformedStep(f"{keyword} has no value", MISSING_ATTRIBUTE_VALUE)
    return text


def _uid(info: Dataset, keyword: str) -> str:
    uid = _value(info, keyword)
    if not is_uid(uid):
        raise MalformedStep(f"{keyword} is not a UID", INVALID_ATTRIBUTE_VALUE)
    return uid


def _state(info: Dataset) -> str:
    state = _value(info, "PerformedProcedureStepStatus")
    if state not in STATES:
        raise MalformedStep(
            f"Performed Procedure Step Status {state[:20]!r} is not one of {', '.join(STATES)}",
            INVALID_ATTRIBUTE_VALUE,
        )
    return state


def _performed(info: Dataset) -> Performed:
    """The series of the Performed Series Sequence and every (non-)image instance in them."""
    out: list[PerformedImage] = []
    series_uids: list[str] = []
    for series in info.get("PerformedSeriesSequence", None) or ():
        series_uid = _uid(series, "SeriesInstanceUID")
        series_uids.append(series_uid)
        for keyword in (
            "ReferencedImageSequence",
            "ReferencedNonImageCompositeSOPInstanceSequence",
        ):
            for item in series.get(keyword, None) or ():
                out.append(
                    PerformedImage(
                        series_uid,
                        _uid(item, "ReferencedSOPClassUID"),
                        _uid(item, "ReferencedSOPInstanceUID"),
                    )
                )
        if len(out) > MAX_REFERENCES:
            raise MalformedStep(
                f"Performed Series Sequence names more than {MAX_REFERENCES} instances",
                RESOURCE_LIMITATION,
            )
    return Performed(tuple(dict.fromkeys(series_uids)), tuple(out))


def _read(what: str, info: Dataset | None, parse: Callable[[Dataset], T]) -> T:
    """`parse(info)`, with an unreadable element turned into MalformedStep naming `what`."""
    if info is None:
        raise MalformedStep(f"{what} is missing", MISSING_ATTRIBUTE)
    try:
        return parse(info)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, MalformedStep):
            raise
        # pydicom decodes lazily: a broken element fails only when it is read here.
        raise MalformedStep(f"{what} cannot be read: {exc}", INVALID_ATTRIBUTE_VALUE) from exc


def read_create(sop_instance_uid: str, info: Dataset | None) -> StepCreated:
    """An N-CREATE's Attribute List as a StepCreated, or MalformedStep with Annex F's status.

    The step must start IN PROGRESS and name its studies in the Scheduled Step Attribute
    Sequence (every item's Study Instance UID is Type 1).
    """

    def parse(ds: Dataset) -> StepCreated:
        for keyword in CREATE_REQUIRED:
            _value(ds, keyword)
        if _state(ds) != IN_PROGRESS:
            raise MalformedStep(
                "a step is created IN PROGRESS (N-CREATE with another status)",
                INVALID_ATTRIBUTE_VALUE,
            )
        scheduled = ds.get("ScheduledStepAttributesSequence", None)
        if scheduled is None:
            raise MalformedStep("ScheduledStepAttributesSequence is missing", MISSING_ATTRIBUTE)
        if not scheduled:
            raise MalformedStep(
                "ScheduledStepAttributesSequence has no item", MISSING_ATTRIBUTE_VALUE
            )
        studies = tuple(dict.fromkeys(_uid(item, "StudyInstanceUID") for item in scheduled))
        return StepCreated(sop_instance_uid, studies, IN_PROGRESS, _performed(ds))

    if not is_uid(sop_instance_uid):
        raise MalformedStep("Affected SOP Instance UID is not a UID", INVALID_ATTRIBUTE_VALUE)
    return _read("attribute list", info, parse)


def _reason(ds: Dataset) -> str | None:
    codes = ds.get("PerformedProcedureStepDiscontinuationReasonCodeSequence", None) or ()
    for code in codes:
        meaning = str(code.get("CodeMeaning", "") or "").strip()
        if meaning:
            return meaning[:64]
    return None


def read_set(info: Dataset | None) -> StepSet:
    """An N-SET's Modification List as a StepSet, or MalformedStep with Annex F's status."""

    def parse(ds: Dataset) -> StepSet:
        state = _state(ds) if "PerformedProcedureStepStatus" in ds else None
        performed = _performed(ds) if "PerformedSeriesSequence" in ds else None
        return StepSet(state, performed, _reason(ds))

    return _read("modification list", info, parse)


def check_final(state: str, series: Sequence[str]) -> None:
    """MalformedStep unless a step that ends names its series (PS3.4 F.7.2: the Performed
    Series Sequence may not be empty once the status is COMPLETED or DISCONTINUED)."""
    if state in FINAL_STATES and not series:
        raise MalformedStep(
            f"a step set to {state} needs a Performed Series Sequence with an item",
            MISSING_ATTRIBUTE_VALUE,
        )
