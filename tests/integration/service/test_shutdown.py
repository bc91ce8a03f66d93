"""SIGTERM drains: what was acknowledged is kept, new senders are turned away, jobs end cleanly."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage

from tests.daemon_proc import Daemon, wait_for
from tests.integration.service.helpers import (
    acknowledged,
    jobs,
    sop_uids,
    start_storescu,
    stored_sop_uids,
)
from tests.interop.conftest import daemon_config
from tests.peers import require_dcmtk

SUCCESS = 0x0000
REJECTED_TRANSIENT = 0x02


class Sender:
    """storescu in the background; its output is read as it comes, so acks can be counted."""

    def __init__(self, port: int, files: list[Path]) -> None:
        self.proc = start_storescu(port, files)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def acked(self) -> list[Path]:
        return acknowledged("".join(self.lines))

    def finish(self, timeout: float = 120.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10.0)
        return code


def _phantom(tmp_path: Path, name: str, slices: int, seed: int) -> list[Path]:
    from models.phantom import write_series

    return write_series(
        tmp_path / name, slices=slices, rows=32, cols=32, seed=seed, patient_id=f"SHUTDOWN-{seed}"
    )


def _associate(port: int, aet: str = "HOLDER") -> Association:
    """A pynetdicom association the test holds open: it keeps the daemon draining."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title="PACSAI")


def _exit_code(daemon: Daemon, code: int) -> None:
    """serve ends with 0, with its log in the message when it does not."""
    assert code == 0, daemon.log()[-2000:]


def _db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'pacs-ai.db'}"


@pytest.fixture
def receiver_only(tmp_path: Path) -> Callable[..., dict]:
    """A configuration without workers: these tests are about the receiver's drain."""
    models = tmp_path / "no-models"
    models.mkdir()

    def config(drain_seconds: float) -> dict:
        return daemon_config(
            tmp_path,
            models,
            database_url=_db(tmp_path),
            workers={"count": 0},
            # A rejected association whose peer keeps the socket open stays an acceptor
            # until the ACSE (ARTIM) timeout, and the drain waits for it: keep that short.
            dicom={"drain_seconds": drain_seconds, "acse_timeout": 5},
        )

    return config


def test_sigterm_mid_send_lets_the_association_finish_and_turns_new_ones_away(
    tmp_path: Path, receiver_only: Callable[..., dict], make_daemon: Callable[..., Daemon]
) -> None:
    require_dcmtk()
    daemon = make_daemon(receiver_only(drain_seconds=60)).start()
    assert daemon.proc is not None
    files = _phantom(tmp_path, "sixty", 60, seed=1)
    late = _phantom(tmp_path, "late", 1, seed=2)
    held = _associate(daemon.port)
    assert held.is_established
    sender = Sender(daemon.port, files)
    wait_for(lambda: len(sender.acked()) >= 5, 60, "storescu's first acknowledgements")

    daemon.signal(signal.SIGTERM)
    wait_for(lambda: "stopping" in daemon.log(), 10, "serve to start draining")

    turned_away = _associate(daemon.port, aet="LATECOMER")
    assert turned_away.is_rejected, "a new association during the drain must be rejected"
    assert turned_away.acceptor.primitive.result == REJECTED_TRANSIENT
    # The associations that were running go on: storescu finishes its 60 instances...
    assert sender.finish() == 0, "".join(sender.lines)[-2000:]
    assert len(sender.acked()) == len(files)
    # ...and the held one can still store after SIGTERM, then release.
    ds = pydicom.dcmread(late[0])
    assert held.send_c_store(ds).Status == SUCCESS
    held.release()

    assert daemon.proc.wait(60) == 0, daemon.log()[-2000:]
    assert "draining for shutdown" in daemon.log()
    stored = stored_sop_uids(_db(tmp_path))
    assert sop_uids(files) | sop_uids(late) <= stored
    assert len(stored) == len(files) + 1


def test_a_second_sigterm_stops_at_once_and_keeps_what_was_acknowledged(
    tmp_path: Path, receiver_only: Callable[..., dict], make_daemon: Callable[..., Daemon]
) -> None:
    require_dcmtk()
    daemon = make_daemon(receiver_only(drain_seconds=60)).start()
    assert daemon.proc is not None
    files = _phantom(tmp_path, "sixty", 60, seed=3)
    held = _associate(daemon.port)  # idle: with one SIGTERM serve would wait 60 s for it
    assert held.is_established
    sender = Sender(daemon.port, files)
    wait_for(lambda: len(sender.acked()) >= 5, 60, "storescu's first acknowledgements")

    daemon.signal(signal.SIGTERM)
    wait_for(lambda: "stopping" in daemon.log(), 10, "serve to start draining")
    second = time.monotonic()
    daemon.signal(signal.SIGTERM)

    try:
        code = daemon.proc.wait(15)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"serve still running 15 s after the second SIGTERM:\n{daemon.log()[-2000:]}"
        ) from None
    assert time.monotonic() - second < 15
    assert "second signal: stopping at once" in daemon.log()
    sender.finish(30)
    acked = sender.acked()
    assert acked, "storescu saw no acknowledgement"
    assert sop_uids(acked) <= stored_sop_uids(_db(tmp_path))
    _exit_code(daemon, code)


@pytest.mark.parametrize("signals", [1, 2], ids=["warm", "cold"])
def test_a_job_running_at_sigterm_is_finished_or_given_back(
    tmp_path: Path, demo_models: Path, make_daemon: Callable[..., Daemon], signals: int
) -> None:
    require_dcmtk()
    config = daemon_config(
        tmp_path,
        demo_models,
        database_url=_db(tmp_path),
        dicom={"drain_seconds": 60, "acse_timeout": 5},
    )
    daemon = make_daemon(config).start()
    assert daemon.proc is not None
    from models.phantom import write_series

    files = write_series(tmp_path / "study", slices=24, rows=64, cols=64, lesion=True, seed=5)
    sender = Sender(daemon.port, files)
    assert sender.finish() == 0

    def analysis_running() -> bool:
        return any(j["kind"] == "analyse" and j["state"] == "running" for j in jobs(_db(tmp_path)))

    wait_for(analysis_running, 120, "the analyse job to be running", interval=0.05)
    daemon.signal(signal.SIGTERM)
    if signals == 2:
        wait_for(lambda: "stopping" in daemon.log(), 10, "serve to start draining")
        daemon.signal(signal.SIGTERM)

    code = daemon.proc.wait(90)
    after = jobs(_db(tmp_path))
    assert [j for j in after if j["state"] == "running"] == [], after
    analyse = next(j for j in after if j["kind"] == "analyse")
    if signals == 1:
        assert analyse["state"] == "done", "a warm stop finishes the job in hand"
    else:
        assert analyse["state"] in ("done", "queued"), analyse
    if analyse["state"] == "queued":
        assert analyse["lease_owner"] is None, "a released job keeps no lease"
    _exit_code(daemon, code)
