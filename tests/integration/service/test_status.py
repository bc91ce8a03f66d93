"""`pacs-ai status` answers an operator's first questions about a running installation."""

from __future__ import annotations

import datetime as dt

from daemon import __version__
from tests.integration.service.conftest import ServedDay


def _recent(stamp: str | None) -> bool:
    if stamp is None:
        return False
    when = dt.datetime.fromisoformat(stamp)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return dt.timedelta(0) <= dt.datetime.now(dt.UTC) - when < dt.timedelta(hours=1)


def test_status_json_has_queue_ages_deliveries_destinations_and_spool(
    served_day: ServedDay,
) -> None:
    status = served_day.daemon.cli_json("status")

    assert status["version"] == __version__
    assert status["schema_at_head"] is True
    assert status["jobs"]["analyse"] == {"done": 1}
    assert status["jobs"]["report"] == {"done": 1}
    assert set(status["jobs"]["dispatch"]) == {"done"}, "queue depth by state: all done"
    assert status["oldest_queued_age_s"] is None, "nothing waits"
    assert _recent(status["last_instance_received"]), status["last_instance_received"]
    assert _recent(status["last_sr_delivered"]), status["last_sr_delivered"]
    assert status["dead_letters"] == []
    assert status["instances"] == len(served_day.files)
    assert status["spool_free_bytes"] > 0
    [orthanc] = status["destinations"]
    assert orthanc["name"] == "orthanc"
    assert orthanc["echo_ok"] is True
    assert orthanc["echo"].startswith("echoed: 0x0000"), orthanc["echo"]


def test_status_table_prints_the_same_at_a_glance(served_day: ServedDay) -> None:
    done = served_day.daemon.cli("status")
    assert done.returncode == 0, done.stderr
    text = done.stdout

    assert text.startswith(f"pacs-ai {__version__}")
    assert f"instances {len(served_day.files)}" in text
    assert "oldest queued job: none" in text
    assert "last instance: never" not in text and "last instance: " in text
    assert "last SR delivered: never" not in text and "last SR delivered: " in text
    jobs = {
        line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith("    ")
    }
    assert jobs["analyse"] == ["done", "1"]
    assert jobs["report"] == ["done", "1"]
    assert jobs["dispatch"][0] == "done", jobs
    assert "dead letters" not in text
    assert " free" in text.split("spool ", 1)[1].splitlines()[0]
    orthanc = served_day.orthanc
    assert (
        f"destination orthanc {orthanc.aet}@127.0.0.1:{orthanc.dicom_port}: echoed: 0x0000" in text
    )
