"""MPPS as SCP over loopback (PS3.4 Annex F): steps as rows, Annex F's statuses, a restart
keeps every step's state; on SQLite and PostgreSQL (the `engine` fixture)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import Engine, select

from daemon.db.schema import MppsStep
from daemon.dicom.status import (
    DUPLICATE_SOP_INSTANCE,
    INVALID_ATTRIBUTE_VALUE,
    MISSING_ATTRIBUTE,
    MISSING_ATTRIBUTE_VALUE,
    NO_SUCH_OBJECT_INSTANCE,
    PROCESSING_FAILURE,
    SUCCESS,
)
from daemon.receive import Receiver
from tests.integration.receive.helpers import ct_dataset
from tests.modality import (
    ModalitySimulator,
    mpps_create_attributes,
    mpps_set_attributes,
    performed,
)

Start = Callable[..., Receiver]


def step_row(engine: Engine, uid: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(MppsStep).where(MppsStep.sop_instance_uid == uid)).one()


def test_step_is_created_then_completed_with_its_images(
    engine: Engine, start_receiver: Start, port: int, stored: list[str]
) -> None:
    study_uid, step = generate_uid(), generate_uid()
    images = [ct_dataset(study=study_uid) for _ in range(2)]
    start_receiver(engine)
    with ModalitySimulator("CT01").associate(port) as assoc:
        sim = ModalitySimulator("CT01")
        assert sim.mpps_create(assoc, step, mpps_create_attributes(study_uid)) == SUCCESS
        assert step_row(engine, step).state == "IN PROGRESS"
        sim.store(assoc, images)
        done = mpps_set_attributes("COMPLETED", performed(images))
        assert sim.mpps_set(assoc, step, done) == SUCCESS
    row = step_row(engine, step)
    assert (row.state, row.study_uid, row.calling_ae) == ("COMPLETED", study_uid, "CT01")
    assert sorted(i[2] for i in row.performed["instances"]) == sorted(
        str(ds.SOPInstanceUID) for ds in images
    )
    assert row.ended_at is not None
    assert stored.count(study_uid) == 2 + 2  # two images, and the step's start and end


def test_a_step_ending_tells_the_assembler_of_the_study_its_images_went_to(
    engine: Engine, start_receiver: Start, port: int, stored: list[str]
) -> None:
    scheduled, made, step = generate_uid(), generate_uid(), generate_uid()
    images = [ct_dataset(study=made) for _ in range(2)]
    start_receiver(engine)
    sim = ModalitySimulator("CT01")
    with sim.associate(port) as assoc:
        assert sim.mpps_create(assoc, step, mpps_create_attributes(scheduled)) == SUCCESS
        sim.store(assoc, images)
        stored.clear()
        done = mpps_set_attributes("COMPLETED", performed(images))
        assert sim.mpps_set(assoc, step, done) == SUCCESS
    assert sorted(stored) == sorted([scheduled, made])


def test_discontinued_step_keeps_its_reason(
    engine: Engine, start_receiver: Start, port: int
) -> None:
    study_uid, step = generate_uid(), generate_uid()
    images = [ct_dataset(study=study_uid)]
    start_receiver(engine)
    sim = ModalitySimulator("CT01")
    with sim.associate(port) as assoc:
        sim.mpps_create(assoc, step, mpps_create_attributes(study_uid))
        stop = mpps_set_attributes(
            "DISCONTINUED", performed(images), discontinued_reason="Patient refused"
        )
        assert sim.mpps_set(assoc, step, stop) == SUCCESS
    row = step_row(engine, step)
    assert (row.state, row.discontinued_reason) == ("DISCONTINUED", "Patient refused")


def _without(keyword: str) -> Any:
    def change(ds: Any) -> None:
        delattr(ds, keyword)

    return change


def _empty(keyword: str) -> Any:
    def change(ds: Any) -> None:
        setattr(ds, keyword, "")

    return change


@pytest.mark.parametrize(
    ("change", "status"),
    [
        (_without("PerformedProcedureStepID"), MISSING_ATTRIBUTE),
        (_without("ScheduledStepAttributesSequence"), MISSING_ATTRIBUTE),
        (_empty("Modality"), MISSING_ATTRIBUTE_VALUE),
        (
            lambda ds: setattr(ds, "PerformedProcedureStepStatus", "COMPLETED"),
            INVALID_ATTRIBUTE_VALUE,
        ),
    ],
    ids=["no-step-id", "no-scheduled-step", "empty-modality", "created-completed"],
)
def test_create_breaking_annex_f_is_refused_with_its_status(
    engine: Engine,
    start_receiver: Start,
    port: int,
    change: Callable[[Any], None],
    status: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    attributes = mpps_create_attributes(generate_uid())
    change(attributes)
    start_receiver(engine)
    sim = ModalitySimulator("CT01")
    step = generate_uid()
    with caplog.at_level(logging.WARNING), sim.associate(port) as assoc:
        assert sim.mpps_create(assoc, step, attributes) == status
        assert sim.store(assoc, [ct_dataset()]) == [SUCCESS]  # still serving
    with engine.connect() as conn:
        assert conn.execute(select(MppsStep)).all() == []
    assert len([r for r in caplog.records if r.getMessage().startswith("mpps step refused")]) == 1


def test_set_for_unknown_ended_or_seriesless_step_is_refused(
    engine: Engine, start_receiver: Start, port: int
) -> None:
    study_uid, step = generate_uid(), generate_uid()
    images = [ct_dataset(study=study_uid)]
    start_receiver(engine)
    sim = ModalitySimulator("CT01")
    with sim.associate(port) as assoc:
        done = mpps_set_attributes("COMPLETED", performed(images))
        assert sim.mpps_set(assoc, generate_uid(), done) == NO_SUCH_OBJECT_INSTANCE
        assert sim.mpps_create(assoc, step, mpps_create_attributes(study_uid)) == SUCCESS
        assert sim.mpps_create(assoc, step, mpps_create_attributes(study_uid)) == (
            DUPLICATE_SOP_INSTANCE
        )
        no_series = mpps_set_attributes("COMPLETED", {})
        assert sim.mpps_set(assoc, step, no_series) == MISSING_ATTRIBUTE_VALUE
        assert step_row(engine, step).state == "IN PROGRESS"
        assert sim.mpps_set(assoc, step, done) == SUCCESS
        again = mpps_set_attributes("DISCONTINUED", performed(images))
        assert sim.mpps_set(assoc, step, again) == PROCESSING_FAILURE
    assert step_row(engine, step).state == "COMPLETED"


def test_restart_keeps_every_step_state(
    engine: Engine, start_receiver: Start, port: int, spool_dir: Path
) -> None:
    study_uid = generate_uid()
    running, ended = generate_uid(), generate_uid()
    images = [ct_dataset(study=study_uid)]
    first = start_receiver(engine)
    sim = ModalitySimulator("CT01")
    with sim.associate(port) as assoc:
        sim.mpps_create(assoc, running, mpps_create_attributes(study_uid))
        sim.mpps_create(assoc, ended, mpps_create_attributes(study_uid))
        sim.mpps_set(assoc, ended, mpps_set_attributes("COMPLETED", performed(images)))
    first.stop(1.0)
    start_receiver(engine)
    with sim.associate(port) as assoc:
        assert sim.mpps_set(assoc, ended, mpps_set_attributes("COMPLETED", {})) == (
            PROCESSING_FAILURE
        )
        assert sim.mpps_set(
            assoc, running, mpps_set_attributes("COMPLETED", performed(images))
        ) == (SUCCESS)
    assert step_row(engine, running).state == "COMPLETED"
