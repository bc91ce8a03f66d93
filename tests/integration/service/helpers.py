"""What the service tests observe from outside: sd_notify datagrams, processes, the database."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pydicom
from sqlalchemy import select

from daemon.db.engine import make_engine
from daemon.db.schema import Instance, Job
from tests.daemon_proc import STORESCU, children


@dataclasses.dataclass(frozen=True)
class Datagram:
    """One sd_notify message: its `KEY=value` fields, when it came, what was true then."""

    fields: dict[str, str]
    at: float
    seen: dict[str, Any]

    def __contains__(self, key: str) -> bool:
        return key in self.fields


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET.

    Every datagram is recorded with `time.monotonic()` at arrival and with what `probe()`
    returned right then (e.g. whether the DICOM port accepted a connection).
    """

    def __init__(self, probe: Callable[[], dict[str, Any]] = dict) -> None:
        # A short path: AF_UNIX addresses are limited to 108 bytes, pytest's tmp_path is long.
        self._dir = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")
        self.path = os.path.join(self._dir, "notify")
        self.probe = probe
        self.received: list[Datagram] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(0.2)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._record, name="notify-recorder", daemon=True)
        self._thread.start()

    def _record(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.monotonic()
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.received.append(Datagram(fields, at, self.probe()))

    def env(self, watchdog_usec: int = 1_000_000) -> dict[str, str]:
        """The variables systemd would set for a `Type=notify` unit with `WatchdogSec=`."""
        return {"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": str(watchdog_usec)}

    def having(self, key: str, since: float = 0.0) -> list[Datagram]:
        """Datagrams carrying `key` that arrived at or after `since` (monotonic)."""
        return [d for d in list(self.received) if key in d and d.at >= since]

    def first(self, key: str, timeout: float, since: float = 0.0) -> Datagram:
        """The first datagram with `key` (after `since`); fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.having(key, since)
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no {key} datagram within {timeout} s; last: {self.received[-5:]}")

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        self._thread.join(2.0)
        Path(self.path).unlink(missing_ok=True)
        os.rmdir(self._dir)

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# Processes -----------------------------------------------------------------------------


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def listening_children(serve_pid: int, port: int) -> list[int]:
    """serve's child processes holding a socket that listens on `port`: the receivers."""
    inodes = _listening_inodes(port)
    found = []
    for child in children(serve_pid):
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{child}/fd").iterdir()]
        except OSError:
            continue
        sockets = {link[len("socket:[") : -1] for link in links if link.startswith("socket:[")}
        if sockets & inodes:
            found.append(child)
    return found


# DICOM senders -------------------------------------------------------------------------


def start_storescu(
    port: int, files: Sequence[Path], *, aec: str = "PACSAI", extra: Sequence[str] = ()
) -> subprocess.Popen[str]:
    """DCMTK's storescu in the background, verbose, so acknowledgements can be counted."""
    return subprocess.Popen(
        [
            STORESCU,
            "-v",
            "-aet",
            "STORESCU",
            "-aec",
            aec,
            *extra,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


def acknowledged(storescu_output: str) -> list[Path]:
    """The files storescu sent and saw a Success C-STORE response for."""
    acked: list[Path] = []
    current: Path | None = None
    for line in storescu_output.splitlines():
        if line.startswith("I: Sending file: "):
            current = Path(line.removeprefix("I: Sending file: ").strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(current)
            current = None
    return acked


def sop_uids(files: Sequence[Path]) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


# The database --------------------------------------------------------------------------


def stored_sop_uids(database_url: str) -> set[str]:
    """SOP Instance UIDs the daemon committed."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return set(conn.execute(select(Instance.sop_instance_uid)).scalars())
    finally:
        engine.dispose()


def jobs(database_url: str) -> list[dict[str, Any]]:
    """Every job's id, kind, state and lease owner."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(Job.id, Job.kind, Job.state, Job.lease_owner)).all()
            return [dict(r._mapping) for r in rows]
    finally:
        engine.dispose()


def sqlite_url(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'pacs-ai.db'}"
