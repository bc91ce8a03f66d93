"""`pacs-ai serve` as a real child process, configured by a TOML file the test writes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

PACS_AI = str(Path(sys.executable).parent / "pacs-ai")
STORESCU = "/usr/bin/storescu"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return str(value)


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write a settings dict ({section: {key: value}}, destinations as a list) as TOML."""
    lines: list[str] = []
    for section, table in config.items():
        if section in ("destinations", "sources"):
            for dest in table:
                lines.append(f"[[{section}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in dest.items()]
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on the port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def run_cli(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a `pacs-ai` command against the config and capture its output."""
    return subprocess.run(
        [PACS_AI, *args, "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=120,
    )


def storescu(
    port: int,
    files: Sequence[Path],
    *,
    aec: str = "PACSAI",
    aet: str = "STORESCU",
    extra: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    """Send files with DCMTK's storescu (the Debian binary, by full path)."""
    return subprocess.run(
        [STORESCU, "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (every thread's children, from /proc)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def worker_pids(daemon: Daemon) -> list[int]:
    """The pool's spawned worker processes (not multiprocessing's resource tracker)."""
    assert daemon.proc is not None
    pids = []
    for pid in children(daemon.proc.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            pids.append(pid)
    return pids


class Daemon:
    """A `pacs-ai serve` process on a free port with its own spool, database and log file."""

    def __init__(self, workdir: Path, config: dict[str, Any], env: dict[str, str] | None = None):
        self.workdir = workdir
        self.config = config
        self.port = int(config["dicom"]["port"])
        self.config_path = write_config(workdir / "pacs-ai.toml", config)
        self.log_path = workdir / "serve.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return run_cli(self.config_path, *args, env=self.env)

    def cli_json(self, *args: str) -> Any:
        proc = self.cli(*args, "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def spawn(self, upgrade: bool = True) -> subprocess.Popen[bytes]:
        """Upgrade the database and start `serve` in a session of its own; do not wait."""
        if upgrade:
            done = self.cli("db", "upgrade")
            assert done.returncode == 0, done.stderr
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [PACS_AI, "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        log.close()
        return self.proc

    def start(self, timeout: float = 180.0, upgrade: bool = True) -> Daemon:
        """Upgrade the database, start serving and wait until its ports accept (the DICOM
        port, and the HTTP port when configured: serve opens it after the DICOM one)."""
        self.spawn(upgrade)
        assert self.proc is not None
        ports = [self.port]
        http_port = int(self.config.get("http", {}).get("port", 0))
        if http_port:
            ports.append(http_port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.log()}")
            if all(port_accepts(port) for port in ports):
                return self
            time.sleep(0.2)
        raise RuntimeError(f"serve did not listen within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the whole process group: serve and its workers, or what is left of them."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the group is gone already
        self.proc.wait(10)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop(30.0)
        except subprocess.TimeoutExpired:
            pass  # stop() already killed the process group


def session_members(pid: int) -> list[int]:
    """Live processes (zombies aside) in the process group `pid` led: its workers too, even
    once orphaned, since they keep the group."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp
        if fields[0] != "Z" and int(fields[2]) == pid:
            members.append(int(stat.parent.name))
    return members


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.25) -> Any:
    """Poll until `predicate()` is truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
