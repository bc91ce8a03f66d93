"""How the console tells where a study's assembly stands: why each version closed (the
assembler's own record) and what an open version waits for (the assembler's own rules)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import delete, select, update

from daemon.db import mpps
from daemon.db.schema import ClosedVersion, MppsState, MppsStep, Report, Series, Study, utcnow
from daemon.dicom.mpps import COMPLETED, IN_PROGRESS, Performed, StepCreated, StepSet
from daemon.report.completion import Completion
from tests.console_rows import CLOSINGS, write_documents
from tests.unit.http.console.conftest import Console, StartConsole
from tests.unit.http.console.test_pages import json

CLOSED = "version 1 closed"


def study_id(console: Console, uid: str) -> int:
    with console.engine.connect() as conn:
        return int(conn.execute(select(Study.id).where(Study.study_uid == uid)).scalar_one())


def test_each_version_says_why_it_closed_on_the_timeline_and_in_the_versions_table(
    console: Console,
) -> None:
    client = console.login("victor")
    uids = console.filled.study_uids
    why = {}
    for i in range(5, 10):  # delivered studies closed for each reason in turn
        data = json(client, f"/console/studies/{uids[i]}")
        (version,) = data["versions"]
        assert version["closed_by"] == CLOSINGS[i % len(CLOSINGS)]
        (event,) = [e for e in data["timeline"] if e["what"] == CLOSED]
        assert (event["detail"], event["state"]) == (version["why"], version["closed_by"])
        why[version["closed_by"]] = version["why"]
    assert why["quiet"].startswith("the quiet window")
    assert why["mpps"].startswith("the modality's MPPS") and f"MPPS {uids[6]}.1.77" in why["mpps"]
    assert f"series {uids[7]}.1: InstanceNumber 1..3, even spacing" in why["evidence"]
    assert why["sweep"].startswith("the safety sweep") and why["replay"].startswith("an operator")
    assert 'data-closed-by="mpps"' in client.get(f"/console/studies/{uids[6]}").text
    quiet = study_id(console, uids[5])
    with console.engine.begin() as conn:  # a version closed before the reason was recorded
        conn.execute(delete(ClosedVersion).where(ClosedVersion.study_id == quiet))
    data = json(client, f"/console/studies/{uids[5]}")
    assert [e["detail"] for e in data["timeline"] if e["what"] == CLOSED] == ["reason not recorded"]


def test_a_discontinued_incomplete_procedure_reads_so_in_the_timeline_and_the_sr(
    console: Console, tmp_path: Path
) -> None:
    uid = console.filled.study_uids[6]  # closed by MPPS
    detail = {
        "mpps": ["1.2.3.4"],
        "discontinued": [{"step": "1.2.3.4", "reason": "patient moved"}],
        "incomplete_series": [{"series": f"{uid}.1", "arrived": 3, "expected": 5}],
    }
    notes = Completion.from_detail(detail).notes
    docs = write_documents(tmp_path / "partial", completion=Completion.from_detail(detail))
    sid = study_id(console, uid)
    with console.engine.begin() as conn:
        conn.execute(
            update(ClosedVersion).where(ClosedVersion.study_id == sid).values(detail=detail)
        )
        conn.execute(update(Report).where(Report.study_id == sid).values(path=str(docs.sr)))
    data = json(console.login("victor"), f"/console/studies/{uid}")
    (event,) = [e for e in data["timeline"] if e["what"] == CLOSED]
    sr = "\n".join(line for _, line in data["sr"]["lines"])
    assert notes[0].startswith("Procedure discontinued by the modality (MPPS 1.2.3.4")
    for note in notes:
        assert note in event["detail"] and note in sr
    assert dict(data["sr"]["header"])["Completion"] == "PARTIAL"


def test_a_waiting_study_says_what_it_waits_for_as_the_assembler_decides(
    start_console: StartConsole,
) -> None:
    console = start_console(studies=4, assembly={"quiet_seconds": 7200, "evidence_seconds": 3600})
    uid = console.study("waiting")
    client = console.login("victor")

    def waits_for(last_received_ago: float | None = None, **step: object) -> str:
        with console.engine.begin() as conn:
            if last_received_ago is not None:
                at = utcnow() - dt.timedelta(seconds=last_received_ago)
                conn.execute(
                    update(Study).where(Study.study_uid == uid).values(last_received_at=at)
                )
            if step:
                conn.execute(update(MppsStep).where(MppsStep.study_uid == uid).values(**step))
        study = json(client, f"/console/studies/{uid}")["study"]
        (row,) = json(client, "/console/studies?state=waiting")["page"]["rows"]
        assert (study["state"], row["study_uid"], row["waiting_for"]) == (
            "waiting",
            uid,
            study["waiting_for"],
        )  # the filter finds it waiting, and the list and its page say for the same
        return f"{study['waiting_for']}: {study['meaning']}"

    assert waits_for(2 * 3600) == (
        "quiet window: waiting for the quiet window: closes 7200 s after the last instance"
    )
    assert waits_for(60).startswith("evidence: checking the images' evidence: closes 3600 s")
    with console.engine.begin() as conn:
        mpps.create_step(conn, StepCreated("1.2.3.99", (uid,), IN_PROGRESS, Performed()), "CT3")
    assert waits_for().startswith("MPPS: waiting for MPPS: the modality's procedure step")
    assert waits_for(state=MppsState.COMPLETED).startswith("MPPS images: the modality's MPPS ended")
    assert waits_for(closed_version=1).startswith("evidence:")  # the step was taken already
    with console.engine.begin() as conn:  # a step naming another study made one of its series
        series_uid = conn.execute(
            select(Series.series_uid).join(Study).where(Study.study_uid == uid).limit(1)
        ).scalar_one()
        made = Performed((series_uid,))
        mpps.create_step(conn, StepCreated("1.2.3.98", ("1.2.3.97",), IN_PROGRESS, made), "CT3")
        mpps.set_step(conn, "1.2.3.98", StepSet(COMPLETED, made, None))
    assert waits_for().startswith("MPPS images: the modality's MPPS ended")
