"""Workers yield the CPU to the receiver: a sender waits on every C-STORE answer."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from tests.daemon_proc import Daemon, wait_for, worker_pids
from tests.interop.conftest import daemon_config


def _nice(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


def test_workers_and_their_threads_run_the_configured_nice_steps_below_serve(
    tmp_path: Path, demo_models: Path, make_daemon: Callable[..., Daemon]
) -> None:
    config = daemon_config(tmp_path, demo_models, workers={"count": 1, "nice": 7})
    daemon = make_daemon(config).start()
    assert daemon.proc is not None
    wait_for(lambda: "worker ready" in daemon.log(), 120, "the worker to load its models")
    (worker,) = worker_pids(daemon)
    expected = min(_nice(daemon.proc.pid) + 7, 19)
    threads = [int(t) for t in os.listdir(f"/proc/{worker}/task")]
    assert len(threads) > 1  # TensorFlow's threads, started after the worker lowered itself
    assert {_nice(t) for t in threads} == {expected}
