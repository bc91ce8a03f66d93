"""Soak: 200 small studies through the whole pipeline without growing, leaking or sticking.

Studies are sent as the pipeline drains (at most `AHEAD` undelivered), so receiving,
analysing, reporting and sending overlap from the first study to the last. The resident
memory of `serve` and of its worker is sampled once 50 studies have their SR and again at
200; neither may grow by 10 % or more in between.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import Comprehensive3DSRStorage, CTImageStorage, EnhancedSRStorage

from daemon.spool import TMP_DIR
from tests.daemon_proc import Daemon, wait_for, worker_pids
from tests.interop.conftest import daemon_config
from tests.peers import RecordingSCP
from tests.reliability import harness as h

STUDIES = int(os.environ.get("PACSAI_SOAK_STUDIES", "200"))
BASELINE_AT = min(50, STUDIES // 4)
AHEAD = 6
MAX_GROWTH = 0.10
SR_CLASSES = {Comprehensive3DSRStorage, EnhancedSRStorage}


def _send_study(port: int, files: list[Path]) -> None:
    ae = AE(ae_title="SOAKSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI")
    assert assoc.is_established
    try:
        for path in files:
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
    finally:
        assoc.release()


def _settled(engine: Any) -> bool:
    return h.open_instances(engine) == 0 and h.all_jobs_finished(engine)


def _rss(daemon: Daemon) -> dict[int, int]:
    """VmRSS (KiB) of `serve` and of each pool worker, by pid."""
    assert daemon.proc is not None
    pids = [daemon.proc.pid, *worker_pids(daemon)]
    return {pid: h.rss_kib(pid) for pid in pids}


@pytest.mark.slow
def test_soak_of_small_studies_keeps_memory_flat_and_leaves_nothing_behind(
    tmp_path: Path, demo_models: Path, make_daemon: Callable[..., Daemon]
) -> None:
    from models.phantom import write_series

    studies = [
        write_series(tmp_path / f"study-{i}", slices=2, rows=32, cols=32, seed=1000 + i)
        for i in range(STUDIES)
    ]
    uids = [str(pydicom.dcmread(s[0], stop_before_pixels=True).StudyInstanceUID) for s in studies]
    accepted = [*SR_CLASSES, SecondaryCaptureImageStorage]
    with RecordingSCP(accepted) as pacs:
        config = daemon_config(
            tmp_path,
            demo_models,
            assembly={"quiet_seconds": 0.5, "sweep_seconds": 5},
            destinations=[
                {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port}
            ],
        )
        daemon = make_daemon(config).start()
        engine = h.daemon_database(daemon)

        def delivered() -> int:
            return sum(1 for cls, _sop, _ae in pacs.received if cls in SR_CLASSES)

        try:
            baseline: dict[int, int] = {}
            for i, files in enumerate(studies):
                wait_for(lambda i=i: i - delivered() < AHEAD, 120, f"the pipeline at study {i}")
                _send_study(daemon.port, files)
                if i + 1 == BASELINE_AT:
                    wait_for(lambda: delivered() >= BASELINE_AT, 120, "the baseline SRs")
                    baseline = _rss(daemon)
            wait_for(lambda: delivered() >= STUDIES, 300, "every study's SR", 0.5)
            wait_for(lambda: _settled(engine), 120, "every job finished", 0.5)
            final = _rss(daemon)

            assert set(final) == set(baseline), "a worker was replaced during the soak"
            for pid, before in baseline.items():
                assert final[pid] < before * (1 + MAX_GROWTH), (
                    f"pid {pid} grew from {before} KiB to {final[pid]} KiB"
                )
            assert not [j for j in h.jobs(engine) if j.state == "running"], "a lease is stuck"
            assert not [j for j in h.jobs(engine) if j.state == "dead"]
            assert list((tmp_path / "spool" / TMP_DIR).iterdir()) == [], "leaked temp files"
            received_srs = [sop for cls, sop, _ae in pacs.received if cls in SR_CLASSES]
            assert len(received_srs) == len(set(received_srs)), "an SR was sent twice"
            reported: set[str] = set()
            for uid in uids:
                # A study whose two slices came further apart than the quiet window has two
                # versions, each with its own SR: one SR per analysed version.
                reports = h.reports_of(engine, uid)
                assert [r.study_version for r in reports] == h.analysed_versions(engine, uid)
                reported |= {r.sop_instance_uid for r in reports}
            assert set(received_srs) == reported, "every SR delivered, and only those"
        finally:
            engine.dispose()
