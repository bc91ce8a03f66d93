"""A PACS that refuses us: the report becomes a dead letter, and an operator's retry delivers it.

(A PACS that is down and comes back on its own is in tests/interop/test_end_to_end.py.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom

from tests.daemon_proc import Daemon, storescu, wait_for
from tests.interop.conftest import daemon_config
from tests.peers import Modality, Orthanc, require_dcmtk, require_orthanc
from tests.reliability import harness as h


def test_pacs_refusing_our_ae_gives_a_dead_letter_that_an_operator_retry_delivers(
    tmp_path: Path, demo_models: Path, make_daemon: Callable[..., Daemon]
) -> None:
    require_dcmtk()
    require_orthanc()
    from models.phantom import write_series

    files = write_series(tmp_path / "series", slices=4, rows=48, cols=48, lesion=True, seed=31)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    config = daemon_config(
        tmp_path,
        demo_models,
        retry={"max_attempts": 2, "base_seconds": 1, "cap_seconds": 2},
        report={"heatmap_top_k": 0},  # the SR alone: one outbox row, one dead letter
    )
    pacs_dir = tmp_path / "orthanc"
    refusing = Orthanc(allow_unknown=False, modalities=[], workdir=pacs_dir)
    welcoming: Orthanc | None = None
    try:
        refusing.start()
        config["destinations"] = [
            {
                "name": "pacs",
                "ae_title": refusing.aet,
                "host": "127.0.0.1",
                "port": refusing.dicom_port,
            }
        ]
        daemon = make_daemon(config).start()
        assert storescu(daemon.port, files).returncode == 0

        def dead_letter() -> list[dict]:
            status = daemon.cli_json("status", "--no-echo")
            return [d for d in status["dead_letters"] if d["kind"] == "dispatch"]

        (letter,) = wait_for(dead_letter, 180, "the refused dispatch among the dead letters", 1.0)
        assert "pacs" in letter["last_error"]
        status = daemon.cli_json("status", "--no-echo")
        assert status["dispatches"] == {"dead": 1}
        (job,) = daemon.cli_json("jobs", "list", "--kind", "dispatch")
        assert (job["state"], job["attempts"], job["max_attempts"]) == ("dead", 2, 2)
        assert "calling AE" in letter["last_error"] or "rejected" in letter["last_error"]
        assert refusing.find_sr(study_uid) == []

        # The PACS administrator adds our AE: the same Orthanc (storage, ports), now knowing us.
        refusing.stop()
        welcoming = Orthanc(
            modalities=[Modality("PACSAI", "127.0.0.1", daemon.port)],
            allow_unknown=False,
            workdir=pacs_dir,
            dicom_port=refusing.dicom_port,
            http_port=refusing.http_port,
        )
        welcoming.start()
        assert welcoming.find_sr(study_uid) == []
        retried = daemon.cli("jobs", "retry", str(letter["id"]))
        assert retried.returncode == 0, retried.stderr

        srs = wait_for(lambda: welcoming.find_sr(study_uid), 120, "the SR after the retry")
        assert len(srs) == 1
        engine = h.daemon_database(daemon)
        try:
            wait_for(lambda: h.dispatch_states(engine) == ["sent"], 60, "the dispatch sent")
            h.assert_one_sr_per_version(engine, study_uid, [s["SOPInstanceUID"] for s in srs])
        finally:
            engine.dispose()
        assert daemon.cli_json("status", "--no-echo")["dead_letters"] == []
    finally:
        refusing.close()
        if welcoming is not None:
            welcoming.close()
