"""Eight DCMTK senders at once while the worker analyses: every instance stored exactly once."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from tests.daemon_proc import STORESCU, Daemon, storescu, wait_for
from tests.interop.conftest import daemon_config
from tests.peers import require_dcmtk
from tests.reliability import harness as h

SENDERS = 8
PER_SENDER = 50


@pytest.mark.slow  # a load test (~1-2 min with its set-up): `make test-all` and CI
def test_eight_concurrent_senders_store_every_instance_once_without_lock_errors(
    tmp_path: Path,
    demo_models: Path,
    database_url: str,
    make_daemon: Callable[..., Daemon],
) -> None:
    require_dcmtk()
    from models.phantom import write_series

    batches = [
        write_series(tmp_path / f"sender-{i}", slices=PER_SENDER, rows=32, cols=32, seed=50 + i)
        for i in range(SENDERS)
    ]
    sops = {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        for batch in batches
        for f in batch
    }
    assert len(sops) == SENDERS * PER_SENDER
    busy = write_series(tmp_path / "busy", slices=120, rows=48, cols=48, seed=49)
    # The busy study's CNN runs inside its analysis (not early), so the load meets it there.
    config = daemon_config(tmp_path, demo_models, database_url=database_url,
                           assembly={"early_seconds": 0})
    daemon = make_daemon(config).start()
    engine = h.daemon_database(daemon)
    try:
        # A large study first: the load arrives while the worker analyses it.
        assert storescu(daemon.port, busy).returncode == 0
        wait_for(lambda: h.running_job(engine, "analyse"), 120, "an analysis running", 0.05)
        senders = [
            subprocess.Popen(
                [STORESCU, "-aet", f"SENDER{i}", "-aec", "PACSAI", "127.0.0.1", str(daemon.port)]
                + [str(f) for f in batch],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "TCP_NODELAY": "1"},
            )
            for i, batch in enumerate(batches)
        ]
        outputs = [p.communicate(timeout=300)[0] for p in senders]
        for proc, output in zip(senders, outputs, strict=True):
            assert proc.returncode == 0, output

        rows = [r for r in h.instance_rows(engine) if r.sop_instance_uid in sops]
        stored = [r.sop_instance_uid for r in rows]
        assert len(stored) == len(set(stored)) == SENDERS * PER_SENDER
        assert set(stored) == sops
        assert len(h.instance_rows(engine)) == SENDERS * PER_SENDER + len(busy)
        h.assert_spool_holds_only_committed_instances(tmp_path / "spool", engine)

        wait_for(
            lambda: h.open_instances(engine) == 0 and h.all_jobs_finished(engine),
            300,
            "every study queued and analysed",
            1.0,
        )
        analysed = h.jobs(engine, "analyse")
        assert {j.state for j in analysed} == {"done"}
        assert analysed[0].finished_at > min(r.received_at for r in rows), (
            "the first analysis ended before the load began"
        )
        assert {j.payload["study_uid"] for j in analysed} == set(h.study_uids(engine))
        assert "database is locked" not in daemon.log()
        assert " ERROR " not in daemon.log()
    finally:
        engine.dispose()
