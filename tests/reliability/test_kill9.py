"""SIGKILL at every stage, restart `serve` on the same spool: nothing lost, nothing twice.

Each test kills real processes at a moment it can prove (the row a worker holds is still
`running` after the kill, or the sender saw some instances acknowledged and not others),
restarts, and checks the end state: every acknowledged instance stored once with its bytes,
and each analysed study version reported by exactly one SR (one SOP Instance UID) at the PACS.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    CTImageStorage,
    EnhancedSRStorage,
)
from sqlalchemy import text

from tests.daemon_proc import Daemon, storescu, wait_for, worker_pids
from tests.interop.conftest import daemon_config
from tests.peers import Modality, Orthanc, RecordingSCP, require_dcmtk, require_orthanc
from tests.reliability import harness as h
from tests.strace import killed_at_write, parse, require_strace

# Short leases: a killed worker's job is back in the queue within lease + one reaper pass.
LEASE_SECONDS = 5
SETTLE_TIMEOUT = 240


def _series(tmp_path: Path, *, slices: int, seed: int, size: int = 64) -> list[Path]:
    from models.phantom import write_series

    return write_series(
        tmp_path / f"series-{seed}", slices=slices, rows=size, cols=size, lesion=True, seed=seed
    )


def _study_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _config(tmp_path: Path, models: Path, database_url: str) -> dict[str, Any]:
    """One worker with a short lease; the destination is added once the peer has its port."""
    return daemon_config(
        tmp_path,
        models,
        database_url=database_url,
        workers={"count": 1, "lease_seconds": LEASE_SECONDS},
        dicom={"drain_seconds": 1},
    )


def _orthanc_destination(orthanc: Orthanc) -> dict[str, Any]:
    return {
        "name": "orthanc",
        "ae_title": orthanc.aet,
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
    }


@contextlib.contextmanager
def _serving_to_orthanc(
    config: dict[str, Any], make_daemon: Callable[..., Daemon]
) -> Iterator[tuple[Orthanc, Daemon, Any]]:
    """A real Orthanc as the destination, the daemon serving to it, and its database."""
    with Orthanc(modalities=[Modality("PACSAI", "127.0.0.1", config["dicom"]["port"])]) as pacs:
        config["destinations"] = [_orthanc_destination(pacs)]
        daemon = make_daemon(config).start()
        engine = h.daemon_database(daemon)
        try:
            yield pacs, daemon, engine
        finally:
            engine.dispose()


def _settled(engine: Any) -> bool:
    """Every instance's version queued and every job finished."""
    return h.open_instances(engine) == 0 and h.all_jobs_finished(engine)


def _wait_settled(engine: Any, what: str) -> None:
    wait_for(lambda: _settled(engine), SETTLE_TIMEOUT, what, interval=0.5)
    assert not [j for j in h.jobs(engine) if j.state == "dead"], "a job went dead"
    assert set(h.dispatch_states(engine)) == {"sent"}


def _sr_uids(orthanc: Orthanc, study_uid: str) -> list[str]:
    return [str(sr["SOPInstanceUID"]) for sr in orthanc.find_sr(study_uid)]


class _SlowSender(threading.Thread):
    """Sends files one association, one C-STORE at a time; records what was acknowledged."""

    def __init__(self, port: int, files: list[Path], gap_s: float) -> None:
        super().__init__(name="slow-sender", daemon=True)
        self.port = port
        self.files = files
        self.gap_s = gap_s
        self.acknowledged: list[str] = []
        self.failed_at: str | None = None

    def run(self) -> None:
        ae = AE(ae_title="SLOWSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="PACSAI")
        assert assoc.is_established
        try:
            for path in self.files:
                ds = pydicom.dcmread(path)
                if not assoc.is_established:  # the daemon died between two stores
                    self.failed_at = str(ds.SOPInstanceUID)
                    return
                try:
                    rsp = assoc.send_c_store(ds)
                except RuntimeError:  # pynetdicom: the association ended under us
                    self.failed_at = str(ds.SOPInstanceUID)
                    return
                if "Status" not in rsp or rsp.Status != 0:
                    self.failed_at = str(ds.SOPInstanceUID)
                    return
                self.acknowledged.append(str(ds.SOPInstanceUID))
                time.sleep(self.gap_s)
        finally:
            if assoc.is_established:
                assoc.release()


def test_receiver_killed_mid_association_keeps_each_acknowledged_instance_once(
    tmp_path: Path,
    demo_models: Path,
    database_url: str,
    make_daemon: Callable[..., Daemon],
) -> None:
    require_dcmtk()
    require_orthanc()
    files = _series(tmp_path, slices=40, seed=21)
    study_uid = _study_uid(files)
    config = _config(tmp_path, demo_models, database_url)
    with _serving_to_orthanc(config, make_daemon) as (pacs, daemon, engine):
        sender = _SlowSender(daemon.port, files, gap_s=0.03)
        sender.start()
        wait_for(lambda: len(sender.acknowledged) >= 15, 120, "15 acknowledged instances")
        daemon.kill()  # serve, its receiver threads and the workers, mid-association
        sender.join(60)
        acknowledged = list(sender.acknowledged)
        assert sender.failed_at is not None, "the kill came after the whole series"
        assert 15 <= len(acknowledged) < len(files)

        stored = {r.sop_instance_uid for r in h.instance_rows(engine)}
        assert set(acknowledged) <= stored, "an acknowledged instance was lost"
        h.assert_spool_holds_only_committed_instances(
            tmp_path / "spool", engine, unnamed_allowed=True
        )

        daemon.start()
        sent = storescu(daemon.port, files)
        assert sent.returncode == 0, sent.stderr
        rows = h.instance_rows(engine)
        sops = [r.sop_instance_uid for r in rows]
        assert len(sops) == len(set(sops)) == len(files), "each instance stored once"
        assert set(sops) == {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
        h.assert_spool_holds_only_committed_instances(tmp_path / "spool", engine)

        _wait_settled(engine, "every version analysed, reported and sent")
        h.assert_one_sr_per_version(engine, study_uid, _sr_uids(pacs, study_uid))


def test_worker_killed_during_analysis_is_restarted_and_the_study_reported_once(
    tmp_path: Path,
    demo_models: Path,
    database_url: str,
    make_daemon: Callable[..., Daemon],
) -> None:
    require_dcmtk()
    require_orthanc()
    files = _series(tmp_path, slices=40, seed=22)
    study_uid = _study_uid(files)
    config = _config(tmp_path, demo_models, database_url)
    config["assembly"]["early_seconds"] = 0  # the CNN runs inside the analysis the kill hits
    with _serving_to_orthanc(config, make_daemon) as (pacs, daemon, engine):
        assert storescu(daemon.port, files).returncode == 0
        job = wait_for(
            lambda: h.running_job(engine, "analyse"), 120, "the analyse job running", 0.02
        )
        victim = h.lease_pid(job)
        assert victim in worker_pids(daemon)
        h.sigkill(victim)
        held = h.jobs(engine, "analyse")[0]
        assert (held.state, held.lease_owner) == ("running", job.lease_owner), (
            "the worker finished before it was killed"
        )

        wait_for(
            lambda: [p for p in worker_pids(daemon) if p != victim],
            120,
            "the pool to start a new worker",
        )
        _wait_settled(engine, "the reclaimed analysis to be reported and sent")
        analysed = h.jobs(engine, "analyse")
        assert [(j.state, j.attempts) for j in analysed] == [("done", 2)]
        assert "worker died, restarting" in daemon.log()
        assert "expired leases returned to the queue" in daemon.log()
        h.assert_one_sr_per_version(engine, study_uid, _sr_uids(pacs, study_uid))
        assert len(_sr_uids(pacs, study_uid)) == 1


def test_serve_killed_while_building_the_report_resumes_with_one_sr(
    tmp_path: Path,
    demo_models: Path,
    database_url: str,
    make_daemon: Callable[..., Daemon],
) -> None:
    require_dcmtk()
    require_orthanc()
    files = _series(tmp_path, slices=12, seed=23)
    study_uid = _study_uid(files)
    config = _config(tmp_path, demo_models, database_url)
    with _serving_to_orthanc(config, make_daemon) as (pacs, daemon, engine):
        assert storescu(daemon.port, files).returncode == 0
        job = wait_for(lambda: h.running_job(engine, "report"), 120, "the report job running", 0.01)
        daemon.kill()
        held = h.jobs(engine, "report")[0]
        assert (held.state, held.lease_owner) == ("running", job.lease_owner), (
            "the report was finished before the kill"
        )
        assert h.reports_of(engine, study_uid) == []
        assert _sr_uids(pacs, study_uid) == []

        daemon.start()
        _wait_settled(engine, "the report rebuilt and sent after the restart")
        reports = h.jobs(engine, "report")
        assert [(j.state, j.attempts) for j in reports] == [("done", 2)]
        h.assert_one_sr_per_version(engine, study_uid, _sr_uids(pacs, study_uid))
        assert len(_sr_uids(pacs, study_uid)) == 1


def test_serve_killed_after_the_pacs_stored_the_sr_before_it_was_marked_sent_resends_the_same_sr(
    tmp_path: Path,
    demo_models: Path,
    database_url: str,
    make_daemon: Callable[..., Daemon],
) -> None:
    """The PACS holds the SR and the daemon never learnt it: the resend is the same SOP instance.

    The destination is a pynetdicom SCP that records each C-STORE, then waits 3 s before it
    answers: the kill lands in that window, after the PACS has the SR and before the
    daemon could mark the dispatch sent.
    """
    require_dcmtk()
    files = _series(tmp_path, slices=6, seed=24)
    study_uid = _study_uid(files)
    with RecordingSCP([Comprehensive3DSRStorage, EnhancedSRStorage], delay_s=3.0) as pacs:
        dest = {"name": "slowpacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port}
        config = _config(tmp_path, demo_models, database_url)
        config["destinations"] = [dest]
        config["report"] = {"heatmap_top_k": 0}  # the SR is the first and only store
        daemon = make_daemon(config).start()
        engine = h.daemon_database(daemon)
        try:
            assert storescu(daemon.port, files).returncode == 0
            wait_for(lambda: pacs.received, 180, "the SR at the PACS", 0.01)
            daemon.kill()
            held = h.jobs(engine, "dispatch")[0]
            assert held.state == "running"
            assert h.dispatch_states(engine) == ["pending"]

            daemon.start()
            _wait_settled(engine, "the dispatch resent after the restart")
            assert [(j.state, j.attempts) for j in h.jobs(engine, "dispatch")] == [("done", 2)]
            received = [sop for _cls, sop, _ae in pacs.received]
            assert len(received) >= 2, "the SR was not sent again"
            assert len(set(received)) == 1, f"the resend made another SR: {received}"
            h.assert_one_sr_per_version(engine, study_uid, set(received))
        finally:
            engine.dispose()


def _version_and_analyses(engine: Any, study_uid: str) -> tuple[int, int]:
    """The study's open version, and how many analyse jobs exist for it."""
    with engine.connect() as conn:
        version = conn.execute(
            text("SELECT version FROM studies WHERE study_uid = :uid"), {"uid": study_uid}
        ).scalar_one()
    return int(version), len(h.jobs(engine, "analyse"))


def _kill_sqlite_closer(daemon: Daemon, tmp_path: Path, study_uid: str) -> None:
    """SIGKILL serve as it writes the closing transaction's second WAL frame (its first page).

    Nothing else in serve writes then: the series is stored, early analysis is off, the
    worker is another process. The killed write carries the study's rows, so the kill fell
    inside the transaction that closes the version and queues its analysis.
    """
    assert daemon.proc is not None
    wal = Path(f"{daemon.config['storage']['database_url'].removeprefix('sqlite:///')}-wal")
    with killed_at_write(daemon.proc.pid, wal, 2, tmp_path / "kill.strace") as trace:
        daemon.proc.wait(60)
    killed = [c for c in parse(trace.read_text()) if c.name in ("write", "pwrite64")][-1]
    assert "= ?" in killed.text and study_uid in killed.text, trace.read_text()[-2000:]


def _kill_postgres_closer(daemon: Daemon, engine: Any, study_uid: str) -> None:
    """Hold the study's row so the closer waits inside its transaction, prove it, SIGKILL.

    The closing UPDATE blocked by our lock is in pg_stat_activity; serve dies with it held.
    """
    with engine.connect() as conn, conn.begin():
        conn.execute(
            text("SELECT id FROM studies WHERE study_uid = :uid FOR UPDATE"), {"uid": study_uid}
        )

        def closer_waits() -> str | None:
            # pg_stat_activity is read once per transaction unless told to look again.
            conn.execute(text("SELECT pg_stat_clear_snapshot()"))
            return conn.execute(
                text(
                    "SELECT query FROM pg_stat_activity"
                    " WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
                )
            ).scalar_one_or_none()

        blocked = wait_for(closer_waits, 60, "the closing transaction to wait on the study row")
        assert blocked.startswith("UPDATE studies SET version"), blocked
        daemon.kill()


def test_serve_killed_inside_the_transaction_that_closes_a_version_queues_it_once(
    tmp_path: Path,
    demo_models: Path,
    database_url: str,
    make_daemon: Callable[..., Daemon],
) -> None:
    """kill -9 while a version is being closed and its analysis queued: the transaction is
    lost whole (the version stays open, no job), and after a restart the sweep closes it
    once: one analysis, one SR."""
    require_dcmtk()
    require_orthanc()
    require_strace()
    files = _series(tmp_path, slices=6, seed=25)
    study_uid = _study_uid(files)
    config = _config(tmp_path, demo_models, database_url)
    config["assembly"].update(quiet_seconds=3, early_seconds=0)
    with _serving_to_orthanc(config, make_daemon) as (pacs, daemon, engine):
        assert storescu(daemon.port, files).returncode == 0
        assert _version_and_analyses(engine, study_uid) == (1, 0), "closed too early"
        if database_url.startswith("sqlite"):
            _kill_sqlite_closer(daemon, tmp_path, study_uid)
        else:
            _kill_postgres_closer(daemon, engine, study_uid)
        daemon.kill()  # what is left of the process group: the worker
        assert _version_and_analyses(engine, study_uid) == (1, 0), "the kill came too late"
        assert "study queued for analysis" not in daemon.log()

        daemon.start()
        _wait_settled(engine, "the version closed, analysed, reported and sent")
        assert _version_and_analyses(engine, study_uid) == (2, 1)
        assert [(j.state, j.attempts) for j in h.jobs(engine, "analyse")] == [("done", 1)]
        h.assert_one_sr_per_version(engine, study_uid, _sr_uids(pacs, study_uid))
        assert len(_sr_uids(pacs, study_uid)) == 1
