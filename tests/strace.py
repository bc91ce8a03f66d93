"""Reading an `strace -f -yy` trace back into system calls, and running a process under it.

Each call keeps where it started and where it returned in the trace (its line numbers),
so "A returned before B began" is a comparison of two numbers, as the kernel saw it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

STRACE = "/usr/bin/strace"
# The calls a durable acknowledgement is made of: file and directory flushes, renames,
# and what goes over sockets (the DIMSE response, PostgreSQL's COMMIT round trip).
DURABILITY_CALLS = "fsync,fdatasync,rename,renameat,renameat2,sendto,recvfrom"

_LINE = re.compile(r"^(?P<pid>\d+) +(?P<rest>.*)$")
_CALL = re.compile(r"^(?P<name>\w+)\((?P<args>.*)$")
_RESUMED = re.compile(r"^<\.\.\. (?P<name>\w+) resumed>(?P<args>.*)$")
_FD = re.compile(r"^-?\d+<(?P<what>.*?)>\s*(?:,|\)|$)")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_RESULT = re.compile(r"\)\s+= (?P<result>-?\d+)")


@dataclasses.dataclass(frozen=True)
class Call:
    """One system call: thread, name, its text, and the trace lines it began and returned on."""

    pid: int
    name: str
    text: str
    start: int
    end: int

    @property
    def fd_target(self) -> str:
        """What the first argument's descriptor names (`-yy`): a path, or TCP:[a->b]."""
        match = _FD.match(self.text)
        return match.group("what") if match else ""

    @property
    def strings(self) -> list[str]:
        """The quoted string arguments, as strace escaped them."""
        return _STRING.findall(self.text)

    @property
    def ok(self) -> bool:
        match = _RESULT.search(self.text)
        return match is not None and int(match.group("result")) >= 0


def parse(text: str) -> list[Call]:
    """The completed calls of a trace, joining `<unfinished ...>` and `<... resumed>` halves."""
    calls: list[Call] = []
    pending: dict[int, tuple[str, str, int]] = {}
    for number, line in enumerate(text.splitlines()):
        match = _LINE.match(line)
        if match is None:
            continue
        pid, rest = int(match.group("pid")), match.group("rest")
        resumed = _RESUMED.match(rest)
        if resumed is not None:
            name, args, start = pending.pop(pid, (resumed.group("name"), "", number))
            calls.append(Call(pid, name, args + resumed.group("args"), start, number))
            continue
        call = _CALL.match(rest)
        if call is None:
            continue  # a signal or an exit
        if rest.endswith("<unfinished ...>"):
            args = call.group("args").removesuffix("<unfinished ...>")
            pending[pid] = (call.group("name"), args, number)
            continue
        calls.append(Call(pid, call.group("name"), call.group("args"), number, number))
    return calls


def require_strace() -> None:
    if not Path(STRACE).exists():
        if os.environ.get("CI"):
            pytest.fail("strace is required under CI (tests/system-deps.sh installs it)")
        pytest.skip("strace not installed")


def _attach(pid: int, out: Path, *options: str) -> subprocess.Popen[str]:
    """strace `pid`, every thread and every child it makes, into `out`; returns once attached."""
    command = [STRACE, "-f", "-qq", "-yy", "-o", str(out), *options, "-p", str(pid)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (out.exists() and _attached(pid)):
        if proc.poll() is not None or time.monotonic() > deadline:
            why = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"strace did not attach: {why}")
        time.sleep(0.05)
    return proc


def _finish(proc: subprocess.Popen[str]) -> None:
    """Wait for strace to follow its tracee out, or stop it."""
    if proc.poll() is None:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def traced(pid: int, out: Path, calls: str = DURABILITY_CALLS) -> Iterator[Path]:
    """Trace the process `pid` and every thread and child it has or makes, into `out`.

    Yields once strace has attached; the trace is complete after the traced process ends
    (strace then exits) or when the block leaves (strace is stopped).
    """
    proc = _attach(pid, out, "-s", "4096", "-e", f"trace={calls}")
    try:
        yield out
    finally:
        _finish(proc)


@contextmanager
def killed_at_write(pid: int, path: Path, nth: int, out: Path) -> Iterator[Path]:
    """SIGKILL the process `pid` as one of its threads enters its `nth` write to `path`.

    strace's fault injection: the write never happens, and the trace in `out` shows what
    it would have written (so a test can prove which transaction the kill cut short).
    """
    proc = _attach(
        pid,
        out,
        *("-s", "65536", "-P", str(path), "-e", "trace=write,pwrite64"),
        *("-e", f"inject=write,pwrite64:signal=SIGKILL:when={nth}"),
    )
    try:
        yield out
    finally:
        _finish(proc)


def _attached(pid: int) -> bool:
    """Whether every thread of `pid` has a tracer."""
    tasks = list(Path(f"/proc/{pid}/task").iterdir())
    for task in tasks:
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        tracer = re.search(r"^TracerPid:\s+(\d+)", status, re.M)
        if tracer is None or tracer.group(1) == "0":
            return False
    return bool(tasks)
