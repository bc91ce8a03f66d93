"""A worker's SIGTERMs: the first lets the job finish, the second gives it back, and no
later one can interrupt the giving back (serve's pool may send three in a row)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

_WORKER = """
import os, signal, threading, time
from daemon.worker import ColdShutdown, _install_signals

stopping = threading.Event()
_install_signals(stopping)
os.kill(os.getpid(), signal.SIGTERM)
print("warm" if stopping.is_set() else "still running")
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    print("not stopped")
except ColdShutdown:
    os.kill(os.getpid(), signal.SIGTERM)  # arrives while the job is being given back
    time.sleep(0.2)
    print("given back")
"""


def test_a_third_sigterm_does_not_interrupt_giving_the_job_back() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _WORKER], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["warm", "given", "back"]
