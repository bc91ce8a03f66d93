"""Real de-identified files carry UIDs that break PS3.5's character rules but harm nothing:
such a file, sent by DCMTK, is stored under an encoded name, analysed and warned about."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pydicom

from tests.daemon_proc import Daemon, storescu, wait_for
from tests.integration.receive.helpers import pydicom_file
from tests.interop.conftest import daemon_config
from tests.peers import require_dcmtk


def _done(daemon: Daemon, kind: str) -> dict | None:
    jobs = daemon.cli_json("jobs", "list", "--kind", kind)
    return jobs[0] if jobs and jobs[0]["state"] == "done" else None


def test_a_file_with_hex_uids_is_stored_analysed_and_its_attributes_named_in_the_log(
    tmp_path: Path, demo_models: Path, make_daemon: Callable[..., Daemon]
) -> None:
    require_dcmtk()
    # pydicom's own test file: Study, Series and SOP Instance UIDs of 64 lower-case hex digits.
    source = pydicom_file("bad_sequence.dcm")
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    uids = [str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)]
    config = daemon_config(tmp_path, demo_models)
    daemon = make_daemon(config).start()

    sent = storescu(daemon.port, [source], extra=["-xs"])  # as stored: JPEG Lossless SV1

    assert sent.returncode == 0, sent.stdout + sent.stderr
    study, series, sop = (f"~{urllib.parse.quote(uid, safe='')}" for uid in uids)
    spool = Path(config["storage"]["spool_dir"])
    assert (spool / study / series / f"{sop}.dcm").is_file()
    analysed = wait_for(lambda: _done(daemon, "analyse"), 180, "the analysis of the study")
    results = daemon.cli_json("jobs", "show", str(analysed["id"]))["results"]
    assert results and all(r["error"] is None for r in results), results
    assert {r["series_uid"] for r in results} == {uids[1]}
    wait_for(lambda: _done(daemon, "report"), 120, "the report of the study")
    warned = [line for line in daemon.log().splitlines() if "malformed UID stored" in line]
    assert len(warned) == 1, daemon.log()
    assert "attribute=StudyInstanceUID,SeriesInstanceUID,SOPInstanceUID" in warned[0]
    assert f"study={uids[0]}" in warned[0]
