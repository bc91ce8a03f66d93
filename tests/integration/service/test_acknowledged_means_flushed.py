"""Acknowledged means flushed, as the kernel saw it: `pacs-ai serve` runs under strace while
DCMTK's storescu sends, and the trace alone shows, for every instance, the temporary file's
fsync, its rename into place, the directory's fsync, the database's flush (SQLite's WAL
fdatasync, or PostgreSQL's COMMIT round trip), and only then the C-STORE-RSP on the wire.

With two senders at once, instances may share one group commit: each still needs a flush
of its own directory and a database flush by the committing thread after its rename,
before its response.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest

from tests.conftest import free_port
from tests.daemon_proc import Daemon, storescu
from tests.peers import require_dcmtk
from tests.strace import Call, parse, require_strace, traced

FLUSHES = ("fsync", "fdatasync")
PG_COMMIT = "Q\\0\\0\\0\\vCOMMIT\\0"
PG_COMMITTED = "C\\0\\0\\0\\vCOMMIT\\0"
P_DATA_TF = "\\4"
_LOCAL_PORT = re.compile(r"^TCP:\[[^\]]*?:(\d+)->")


def _first(calls: list[Call], after: int, wanted: Callable[[Call], bool]) -> Call | None:
    return next((c for c in calls if c.start > after and c.ok and wanted(c)), None)


def _is_flush_of(path: str) -> Callable[[Call], bool]:
    return lambda c: c.name in FLUSHES and c.fd_target == path


def _response(calls: list[Call], sop: str, port: int) -> Call | None:
    """Our C-STORE-RSP for `sop`: a P-DATA-TF naming it, written to a socket on our port."""

    def wanted(c: Call) -> bool:
        local = _LOCAL_PORT.match(c.fd_target)
        data = c.strings[0] if c.strings else ""
        return (
            c.name == "sendto"
            and local is not None
            and int(local.group(1)) == port
            and data.startswith(P_DATA_TF)
            and sop in data
        )

    return _first(calls, -1, wanted)


def _database_flush(calls: list[Call], after: Call, sqlite: bool) -> Call | None:
    """The committing thread's first database flush after `after`: the WAL's fdatasync, or
    the end of a COMMIT round trip (its COMMIT sent after `after`, its answer received)."""
    same_thread = [c for c in calls if c.pid == after.pid]
    if sqlite:
        return _first(
            same_thread, after.end, lambda c: c.name in FLUSHES and c.fd_target.endswith("-wal")
        )
    sent = _first(same_thread, after.end, lambda c: c.name == "sendto" and PG_COMMIT in c.text)
    if sent is None:
        return None
    return _first(
        same_thread,
        sent.end,
        lambda c: c.name == "recvfrom" and c.fd_target == sent.fd_target and PG_COMMITTED in c.text,
    )


def acknowledgement_order(calls: list[Call], sop: str, port: int, sqlite: bool) -> str:
    """'ok' when the trace shows the whole order for instance `sop`, else what broke it."""
    response = _response(calls, sop, port)
    if response is None:
        return "no C-STORE-RSP in the trace"
    rename = _first(
        calls,
        -1,
        lambda c: c.name.startswith("rename")
        and len(c.strings) >= 2
        and c.strings[-1].endswith(f"/{sop}.dcm"),
    )
    if rename is None:
        return "never renamed into place"
    temporary, final = rename.strings[-2], rename.strings[-1]
    file_flush = next((c for c in calls if c.ok and _is_flush_of(temporary)(c)), None)
    if file_flush is None or file_flush.end > rename.start:
        return "temporary file not fsync'd before its rename"
    dir_flush = _first(calls, rename.end, _is_flush_of(str(Path(final).parent)))
    if dir_flush is None or dir_flush.end > response.start:
        return "directory not fsync'd after the rename and before the response"
    db_flush = _database_flush(calls, dir_flush, sqlite)
    if db_flush is None or db_flush.end > response.start:
        return "database not flushed after the directory and before the response"
    return "ok"


@pytest.mark.parametrize("senders", [1, 2], ids=["one-sender", "two-senders-group-commit"])
def test_each_instance_is_flushed_to_disk_and_database_before_its_response_is_written(
    tmp_path: Path, database_url: str, make_daemon: Callable[..., Daemon], senders: int
) -> None:
    require_dcmtk()
    require_strace()
    from models.phantom import write_series

    storage = {"spool_dir": tmp_path / "spool", "min_free_mb": 1, "database_url": database_url}
    config = {
        "dicom": {"ae_title": "PACSAI", "bind": "127.0.0.1", "port": free_port()},
        "storage": storage,
        "workers": {"count": 0},  # the receiver alone: nothing else flushes meanwhile
        "assembly": {"quiet_seconds": 600},
        "metrics": {"port": 0},
    }
    daemon = make_daemon(config).start()
    series = [
        write_series(tmp_path / f"series{i}", slices=4, rows=32, cols=32, lesion=False, seed=i)
        for i in range(senders)
    ]
    assert daemon.proc is not None
    with traced(daemon.proc.pid, tmp_path / "serve.strace") as trace:
        with ThreadPoolExecutor(senders) as pool:
            sent = list(pool.map(lambda files: storescu(daemon.port, files), series))
        assert [s.returncode for s in sent] == [0] * senders, [s.stderr for s in sent]
        assert daemon.stop() == 0

    calls = parse(trace.read_text())
    files = [f for one in series for f in one]
    sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    sqlite = database_url.startswith("sqlite")
    order = {sop: acknowledgement_order(calls, sop, daemon.port, sqlite) for sop in sops}
    assert set(order.values()) == {"ok"}, order
