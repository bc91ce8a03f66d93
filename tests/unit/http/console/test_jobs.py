"""A job's page is `pacs-ai jobs show`, and every kind of dead job (a delivery, a modality's
commitment report) is a failure an operator retries or cancels as the CLI does."""

from __future__ import annotations

import json as jsonlib

from sqlalchemy import select

from daemon.db.keys import ANALYSE
from daemon.db.schema import CommitmentRequest, Job, Study
from daemon.status import render_job_detail, show_job
from tests.unit.http.console.conftest import Console, csrf_of, dead_commitment_report
from tests.unit.http.console.test_pages import json


def job_of(console: Console, uid: str, kind: str) -> int:
    with console.engine.connect() as conn:
        return int(
            conn.execute(
                select(Job.id)
                .join(Study, Study.id == Job.study_id)
                .where(Study.study_uid == uid, Job.kind == kind)
            ).scalar_one()
        )


def request_state(console: Console) -> str:
    with console.engine.connect() as conn:
        return str(conn.execute(select(CommitmentRequest.state)).scalar_one())


def test_a_job_page_shows_what_jobs_show_shows_with_why_its_version_closed(
    console: Console,
) -> None:
    client = console.login("victor")
    uid = console.study("failed")  # study 0: closed by the quiet window, its delivery dead
    job_id = job_of(console, uid, ANALYSE)
    data = json(client, f"/console/jobs/{job_id}")
    cli = show_job(console.face.service.settings, job_id)  # what `jobs show --json` prints
    assert data["job"] == jsonlib.loads(jsonlib.dumps(cli, default=str))
    assert data["closing"] == "the quiet window: nothing more arrived"
    (sr,) = data["job"]["reports"]
    assert [(d["destination"], d["state"]) for d in sr["deliveries"]] == [("pacs", "dead")]
    html = client.get(f"/console/jobs/{job_id}").text
    assert "the quiet window: nothing more arrived" in html
    assert "0xA700 out of resources" in html and "SR" in html


def test_a_dead_commitment_report_is_a_failure_retried_and_cancelled_with_its_request(
    console: Console,
) -> None:
    job_id = dead_commitment_report(console, "CT_ROOM3")
    client = console.login("olga")
    overview = json(client, "/console/")["db"]
    shown = next(j for j in overview["dead"] if j["id"] == job_id)
    assert (shown["kind"], shown["destination"]) == ("commitment-report", "CT_ROOM3")
    failures = client.get("/console/failures").text
    row = failures[failures.index(f'<tr data-job="{job_id}">') :].split("</tr>")[0]
    assert "commitment-report → CT_ROOM3" in row and "connection refused" in row
    assert f'data-retry="{job_id}"' in row and f'data-cancel="{job_id}"' in row
    page = json(client, f"/console/jobs/{job_id}")["job"]
    assert page["commitment"]["calling_ae"] == "CT_ROOM3"
    assert (page["commitment"]["state"], page["commitment"]["requested"]) == ("dead", 1)
    assert "Storage Commitment request" in client.get(f"/console/jobs/{job_id}").text
    shown = render_job_detail(show_job(console.face.service.settings, job_id) or {})
    transaction = page["commitment"]["transaction_uid"]
    assert f"commitment {transaction} from CT_ROOM3: dead, 1 instance(s) requested" in shown
    retried = client.post(f"/console/jobs/{job_id}/retry", data={"csrf": csrf_of(client)})
    assert retried.status_code == 303 and request_state(console) == "pending"
    cancelled = client.post(f"/console/jobs/{job_id}/cancel", data={"csrf": csrf_of(client)})
    assert cancelled.status_code == 303 and request_state(console) == "cancelled"
    again = client.post(f"/console/jobs/{job_id}/retry", data={"csrf": csrf_of(client)})
    assert again.status_code == 303 and request_state(console) == "pending"
