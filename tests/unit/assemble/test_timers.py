"""One decision per study at a time, and none lost: a request that comes while a decision
runs is made once more after it (APScheduler alone would skip it)."""

from __future__ import annotations

import threading

import pytest

from daemon.assemble.timers import OneAtATime

WAIT_S = 5.0


def test_requests_during_a_run_are_made_once_after_it() -> None:
    runs = OneAtATime()
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def decision() -> None:
        calls.append(threading.current_thread().name)
        started.set()
        assert release.wait(WAIT_S)

    worker = threading.Thread(target=runs.run, args=("study", decision), name="first")
    worker.start()
    assert started.wait(WAIT_S)
    runs.run("study", decision)  # returns at once: the run in progress takes the request
    runs.run("study", decision)
    assert calls == ["first"]
    release.set()
    worker.join(WAIT_S)
    assert calls == ["first", "first"]  # made again once, after, for both requests


def test_other_keys_run_meanwhile() -> None:
    runs = OneAtATime()
    started, release = threading.Event(), threading.Event()

    def blocking() -> None:
        started.set()
        assert release.wait(WAIT_S)

    worker = threading.Thread(target=runs.run, args=("one study", blocking))
    worker.start()
    assert started.wait(WAIT_S)
    calls: list[str] = []
    runs.run("another study", lambda: calls.append("another"))
    release.set()
    worker.join(WAIT_S)
    assert calls == ["another"]


def test_a_call_that_raises_leaves_the_key_free() -> None:
    runs = OneAtATime()

    def broken() -> None:
        raise RuntimeError("database gone")

    with pytest.raises(RuntimeError, match="database gone"):
        runs.run("study", broken)
    calls: list[str] = []
    runs.run("study", lambda: calls.append("next"))
    assert calls == ["next"]
