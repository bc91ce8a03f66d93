"""A spool on a real, small filesystem that fills up: 0xA700, nothing half-written, then recovery.

`[storage] min_free_mb = 0` switches the early free-space check off, so the store runs
into the kernel's ENOSPC itself. The database lives elsewhere: only the spool is full.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from daemon.dicom import status
from daemon.spool import TMP_DIR
from tests.daemon_proc import Daemon
from tests.interop.conftest import daemon_config
from tests.reliability import harness as h

FS_MB = 8
FILLER_MB = 5
# 40 instances of 128 KiB: more than the room the filler leaves, less than the whole disk.
INSTANCES = 40


def _require_root() -> None:
    if os.geteuid() == 0:
        return
    if os.environ.get("CI"):
        pytest.fail("the full-disk test mounts a tmpfs and must run as root under CI")
    pytest.skip("mounting a tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh tmpfs of FS_MB MiB, unmounted at the end."""
    _require_root()
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_MB}m", "tmpfs", str(mount_point)], check=True
    )
    try:
        yield mount_point
    finally:
        done = subprocess.run(["umount", str(mount_point)], check=False, capture_output=True)
        if done.returncode != 0:  # a process still holds a file: detach it anyway
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


def _files(tmp_path: Path, count: int) -> list[Path]:
    from models.phantom import write_series

    return write_series(tmp_path / "series", slices=count, rows=256, cols=256, seed=41)


def _store_each(port: int, files: list[Path]) -> list[int]:
    """C-STORE the files on one association; the status of each (stops after the first 0xA700)."""
    ae = AE(ae_title="FILLER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI")
    assert assoc.is_established
    statuses = []
    try:
        for path in files:
            statuses.append(int(assoc.send_c_store(pydicom.dcmread(path)).Status))
            if statuses[-1] == status.OUT_OF_RESOURCES:
                break
    finally:
        assoc.release()
    return statuses


def test_full_spool_answers_out_of_resources_keeps_nothing_partial_and_recovers_when_freed(
    tmp_path: Path, small_disk: Path, make_daemon: Callable[..., Daemon]
) -> None:
    spool = small_disk / "spool"
    empty_models = tmp_path / "no-models"
    empty_models.mkdir()
    config = daemon_config(
        tmp_path,
        empty_models,
        database_url=f"sqlite:///{tmp_path / 'pacs-ai.db'}",
        workers={"count": 0},
        storage={"spool_dir": spool, "min_free_mb": 0},
    )
    filler = small_disk / "filler.bin"
    filler.write_bytes(b"\0" * FILLER_MB * 2**20)
    daemon = make_daemon(config).start()
    engine = h.daemon_database(daemon)
    try:
        files = _files(tmp_path, INSTANCES)
        sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
        statuses = _store_each(daemon.port, files)
        assert statuses[-1] == status.OUT_OF_RESOURCES, "the small disk never filled up"
        assert set(statuses[:-1]) == {status.SUCCESS}
        stored, refused = sops[: len(statuses) - 1], sops[len(statuses) - 1]

        rows = {r.sop_instance_uid for r in h.instance_rows(engine)}
        assert rows == set(stored), "rows are exactly the acknowledged instances"
        h.assert_spool_holds_only_committed_instances(spool, engine)
        assert list((spool / TMP_DIR).iterdir()) == [], "a temporary file was left behind"
        assert "No space left on device" in daemon.log(), "the real ENOSPC path was not hit"

        filler.unlink()
        rest = files[len(statuses) - 1 :]
        resumed = _store_each(daemon.port, rest)
        assert resumed == [status.SUCCESS] * len(rest), "storing did not resume"
        rows_now = [r.sop_instance_uid for r in h.instance_rows(engine)]
        assert sorted(rows_now) == sorted(sops), "every instance stored once"
        assert refused in rows_now
        h.assert_spool_holds_only_committed_instances(spool, engine)
        assert daemon.proc is not None and daemon.proc.poll() is None
    finally:
        engine.dispose()
        daemon.kill()
