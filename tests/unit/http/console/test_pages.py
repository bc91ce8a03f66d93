"""What the console's pages show, from real rows and files, and how they answer bad input."""

from __future__ import annotations

import datetime as dt
import io
import re

import httpx
import pytest
from PIL import Image
from sqlalchemy import select, update

from daemon.db.schema import Instance, Job, Study
from daemon.http.console.queries import PAGE_SIZE
from daemon.http.console.stages import STATES
from tests.console_rows import AES, MODALITIES
from tests.unit.http.console.conftest import PER_STUDY, Console, StartConsole, refusals

STUDY_ROW = re.compile(r'<tr data-study="([^"]+)">')


def listed(page: httpx.Response) -> list[str]:
    return STUDY_ROW.findall(page.text)


def json(client: httpx.Client, path: str) -> dict:
    answer = client.get(path, headers={"Accept": "application/json"})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_each_study_reads_as_the_stage_it_is_in_and_each_stage_filter_finds_exactly_those(
    console: Console,
) -> None:
    client = console.login("victor")
    shown: dict[str, str] = {}
    for page in (1, 2, 3):
        for row in json(client, f"/console/studies?page={page}")["page"]["rows"]:
            shown[row["study_uid"]] = row["state"]
    assert shown == console.filled.stages
    for state in STATES:
        expected = {uid for uid, s in console.filled.stages.items() if s == state}
        found = set()
        for page in (1, 2, 3):
            found |= set(listed(client.get(f"/console/studies?state={state}&page={page}")))
        assert found == expected, state


def test_studies_come_newest_first_in_pages(console: Console) -> None:
    client = console.login("victor")
    first, second, third = (client.get(f"/console/studies?page={n}") for n in (1, 2, 3))
    newest_first = list(reversed(console.filled.study_uids))
    assert listed(first) == newest_first[:PAGE_SIZE]
    assert listed(second) == newest_first[PAGE_SIZE : 2 * PAGE_SIZE]
    assert listed(third) == newest_first[2 * PAGE_SIZE :]
    assert 'rel="next"' in first.text and 'rel="next"' not in third.text
    assert client.get("/console/studies?page=99").status_code == 200  # past the end: empty
    assert listed(client.get("/console/studies?page=99")) == []


def test_studies_filter_by_calling_ae_modality_and_received_date(console: Console) -> None:
    client = console.login("victor")
    uids = console.filled.study_uids
    by_ae = listed(client.get(f"/console/studies?calling_ae={AES[1]}"))
    assert by_ae and set(by_ae) == {u for i, u in enumerate(uids) if i % len(AES) == 1}
    by_modality = listed(client.get(f"/console/studies?modality={MODALITIES[2]}"))
    assert set(by_modality) == {u for i, u in enumerate(uids) if i % len(MODALITIES) == 2}
    today = dt.datetime.now(dt.UTC).date()
    tomorrow = today + dt.timedelta(days=1)
    with console.engine.begin() as conn:
        conn.execute(
            update(Study)
            .where(Study.study_uid == uids[0])
            .values(last_received_at=dt.datetime(2020, 5, 17, 12, tzinfo=dt.UTC))
        )
    old = listed(client.get("/console/studies?received_from=2020-05-17&received_to=2020-05-17"))
    assert old == [uids[0]]
    recent = listed(client.get(f"/console/studies?received_from={tomorrow}"))
    assert recent == []
    one = listed(client.get(f"/console/studies?study_uid={uids[7]}"))
    assert one == [uids[7]]


@pytest.mark.parametrize(
    "query",
    ["state=lost", "page=0", "page=x", "received_from=yesterday", f"calling_ae={'A' * 65}"],
)
def test_a_bad_filter_is_400_naming_the_field_and_logged_once(
    console: Console, caplog: pytest.LogCaptureFixture, query: str
) -> None:
    client = console.login("victor")
    caplog.clear()
    answer = client.get(f"/console/studies?{query}")
    assert answer.status_code == 400
    assert query.split("=")[0] in answer.text
    assert len(refusals(caplog)) == 1


def test_the_overview_shows_queue_failures_arrivals_spool_models_and_the_audit_chain(
    console: Console,
) -> None:
    client = console.login("victor")
    data = json(client, "/console/")
    db = data["db"]
    filled = console.filled.stages.values()
    assert db["queue"]["dispatch"]["dead"] == sum(1 for s in filled if s == "failed")
    assert db["queue"]["analyse"]["running"] == sum(1 for s in filled if s == "analysing")
    assert db["dead_total"] == sum(1 for s in filled if s == "failed")
    assert data["receiver_up"] is True
    assert data["audit"]["intact"] and data["audit"]["rows"] > len(console.filled.study_uids)
    assert data["spool"]["free_bytes"] > 0
    assert len(data["chart"]["bars"]) == 36
    assert sum(b["instances"] for b in data["chart"]["bars"]) > 0
    html = client.get("/console/").text
    for part in ("Receiver", "instances/min", "Dead letters", "Spool", "Audit chain", "<svg"):
        assert part in html


def test_the_study_page_shows_timeline_findings_heatmaps_and_the_sr_as_text(
    console: Console,
) -> None:
    client = console.login("victor")
    uid = next(u for i, u in enumerate(console.filled.study_uids) if i % 10 == 5)
    data = json(client, f"/console/studies/{uid}")
    assert data["study"]["state"] == console.filled.stages[uid]
    events = [e["what"] for e in data["timeline"]]
    assert events[0] == "first instance" and "version 1 closed" in events
    assert any(e.startswith("sr sent to pacs") for e in events)
    assert {j["kind"] for j in data["jobs"]} >= {"analyse", "report", "dispatch"}
    lesion = next(f for f in data["findings"] if f["label"] == "lesion" and f["level"] == "image")
    assert (lesion["threshold"], lesion["images"]) == (0.5, PER_STUDY)
    assert len(data["heatmaps"]) == 2 and "Grad-CAM" in data["heatmaps"][0]["caption"]
    assert "Certainty of Finding: 0.87 1" in "\n".join(line for _, line in data["sr"]["lines"])
    html = client.get(f"/console/studies/{uid}").text
    png = client.get(
        f"/console/studies/{uid}/heatmaps/{data['heatmaps'][0]['sop_instance_uid']}.png"
    )
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (64, 64)
    assert "Imaging Measurement Report" in html and "<img" in html


def test_unknown_studies_and_heatmaps_are_404_logged_once(
    console: Console, caplog: pytest.LogCaptureFixture
) -> None:
    client = console.login("victor")
    uid = console.filled.study_uids[0]
    caplog.clear()
    for path in (
        "/console/studies/1.2.3.4.5",
        "/console/studies/not%20a%20uid%2F..",
        f"/console/studies/{uid}/heatmaps/1.2.3.png",
        "/console/no-such-page",
    ):
        assert client.get(path).status_code == 404, path
    assert len(refusals(caplog)) == 4


def test_html_in_an_ae_title_or_an_error_is_shown_escaped(console: Console) -> None:
    uid = console.study("failed")
    with console.engine.begin() as conn:
        study_id = conn.execute(select(Study.id).where(Study.study_uid == uid)).scalar_one()
        conn.execute(
            update(Instance).where(Instance.study_id == study_id).values(calling_ae="<b>X</b>")
        )
        conn.execute(
            update(Job)
            .where(Job.study_id == study_id, Job.state == "dead")
            .values(last_error='<script>alert("pwned")</script>')
        )
    client = console.login("olga")
    listing = "/console/studies?state=failed"
    for path in ("/console/", "/console/failures", f"/console/studies/{uid}", listing):
        text = client.get(path).text
        assert "<script>alert" not in text and "<b>X</b>" not in text, path
    assert (
        "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;"
        in client.get("/console/failures").text
    )
    assert "&lt;b&gt;X&lt;/b&gt;" in client.get(listing).text


def test_patient_name_and_id_only_with_show_patient_data(start_console: StartConsole) -> None:
    hidden = start_console(studies=3)
    uid = hidden.filled.study_uids[0]
    page = hidden.login("victor").get(f"/console/studies/{uid}").text
    assert "CompressedSamples^CT1" not in page
    assert "PatientName" not in page and "PatientID" not in page
    assert "StudyDate" in page and "20040119" in page
    shown = start_console(studies=3, show_patient_data=True)
    page = shown.login("victor").get(f"/console/studies/{shown.filled.study_uids[0]}").text
    assert "CompressedSamples^CT1" in page and "PatientID" in page


def test_the_live_part_alone_is_what_the_page_refreshes_with(console: Console) -> None:
    client = console.login("victor")
    fragment = client.get("/console/studies?fragment=1")
    assert fragment.status_code == 200
    assert "<html" not in fragment.text and 'data-study="' in fragment.text
    page = client.get("/console/studies")
    assert 'data-live="/console/studies?fragment=1"' in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert page.headers["cache-control"] == "no-store"


def test_a_long_list_of_failures_is_paged(start_console: StartConsole) -> None:
    console = start_console(studies=6000)  # 60 failed studies: two pages of dead jobs
    client = console.login("olga")
    first = client.get("/console/failures")
    second = client.get("/console/failures?page=2")
    assert first.text.count("data-retry=") == PAGE_SIZE
    assert second.text.count("data-retry=") == 10
    assert 'rel="next"' in first.text and 'rel="next"' not in second.text
