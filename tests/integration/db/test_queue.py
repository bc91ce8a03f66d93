"""The job queue on real SQLite and PostgreSQL: atomic claims, leases, backoff, operator actions."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, Row, func, update
from sqlalchemy import select as sa_select

from daemon.db import queue
from daemon.db.queue import LeaseLost, RetryPolicy
from daemon.db.schema import Job, utcnow
from tests.integration.db import claimers

REPO_ROOT = Path(__file__).resolve().parents[3]
KIND = "analyse"


def job_row(engine: Engine, job_id: int) -> Row[Any]:
    """The job's columns as the database holds them now."""
    with engine.connect() as conn:
        return conn.execute(sa_select(Job.__table__).where(Job.id == job_id)).one()


def add(engine: Engine, key: str, *, max_attempts: int = 5, **kwargs: object) -> int:
    with engine.begin() as conn:
        return queue.enqueue(conn, KIND, key, max_attempts=max_attempts, **kwargs)  # type: ignore[arg-type]


def make_due(engine: Engine, job_id: int) -> None:
    """Skip the backoff wait: the test is about the delay chosen, not the clock."""
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(run_after=utcnow()))


def claim(engine: Engine, owner: str, lease_seconds: float = 60) -> queue.ClaimedJob | None:
    return queue.claim(engine, owner, [KIND], lease_seconds=lease_seconds)


def test_enqueue_is_idempotent_by_key(engine: Engine) -> None:
    first = add(engine, "study-1/v1", payload={"version": 1})
    again = add(engine, "study-1/v1", payload={"version": 2})
    other = add(engine, "study-1/v2")
    assert again == first
    assert other != first
    with engine.connect() as conn:
        assert conn.execute(sa_select(func.count()).select_from(Job)).scalar_one() == 2
    row = job_row(engine, first)
    assert (row.state, row.attempts, row.payload) == ("queued", 0, {"version": 1})


def test_claim_leases_the_oldest_due_job_and_counts_the_attempt(engine: Engine) -> None:
    first = add(engine, "a", payload={"n": 1})
    add(engine, "b")
    job = claim(engine, "w1", lease_seconds=30)
    assert job is not None
    assert (job.id, job.kind, job.key, job.payload, job.attempts) == (first, KIND, "a", {"n": 1}, 1)
    row = job_row(engine, first)
    assert (row.state, row.lease_owner, row.attempts) == ("running", "w1", 1)
    assert row.lease_expires_at is not None
    remaining = (row.lease_expires_at - utcnow()).total_seconds()
    assert 25 < remaining <= 30


def test_claim_takes_only_the_kinds_asked_for(engine: Engine) -> None:
    with engine.begin() as conn:
        queue.enqueue(conn, "dispatch", "d-1", max_attempts=3)
    assert queue.claim(engine, "w1", [KIND], lease_seconds=60) is None
    job = queue.claim(engine, "w1", ["dispatch", KIND], lease_seconds=60)
    assert job is not None
    assert job.kind == "dispatch"


def test_job_not_yet_due_is_not_claimed(engine: Engine) -> None:
    later = add(engine, "later", run_after=utcnow() + dt.timedelta(hours=1))
    assert claim(engine, "w1") is None
    due = add(engine, "now")
    job = claim(engine, "w1")
    assert job is not None
    assert job.id == due
    assert claim(engine, "w1") is None
    assert job_row(engine, later).state == "queued"


def test_heartbeat_extends_the_lease(engine: Engine) -> None:
    job_id = add(engine, "long")
    job = claim(engine, "w1", lease_seconds=0.3)
    assert job is not None
    assert queue.heartbeat(engine, job_id, "w1", lease_seconds=60)
    row = job_row(engine, job_id)
    assert row.lease_expires_at is not None
    assert (row.lease_expires_at - utcnow()).total_seconds() > 55
    time.sleep(0.5)  # past the first lease
    assert queue.reap_expired(engine) == 0
    row = job_row(engine, job_id)
    assert (row.state, row.lease_owner) == ("running", "w1")


def test_heartbeat_from_another_owner_is_refused(engine: Engine) -> None:
    job_id = add(engine, "mine")
    assert claim(engine, "w1") is not None
    assert not queue.heartbeat(engine, job_id, "w2", lease_seconds=60)
    assert job_row(engine, job_id).lease_owner == "w1"


def test_release_gives_the_job_back_without_counting_the_attempt(engine: Engine) -> None:
    job_id = add(engine, "shutdown")
    assert claim(engine, "w1") is not None
    assert queue.release(engine, job_id, "w1")
    row = job_row(engine, job_id)
    assert (row.state, row.attempts, row.lease_owner, row.lease_expires_at) == (
        "queued",
        0,
        None,
        None,
    )
    again = claim(engine, "w2")
    assert again is not None
    assert (again.id, again.attempts) == (job_id, 1)
    assert not queue.release(engine, job_id, "w1")


def test_complete_marks_done_and_a_done_job_is_not_claimed_again(engine: Engine) -> None:
    job_id = add(engine, "once")
    assert claim(engine, "w1") is not None
    with engine.begin() as conn:
        queue.complete(conn, job_id, "w1")
    row = job_row(engine, job_id)
    assert (row.state, row.lease_owner, row.attempts) == ("done", None, 1)
    assert row.finished_at is not None
    assert claim(engine, "w2") is None


def test_failing_job_backs_off_exponentially_then_dies(engine: Engine) -> None:
    policy = RetryPolicy(base_seconds=0.05, factor=2.0, cap_seconds=10, max_attempts=4, jitter=0.1)
    job_id = add(engine, "flaky", max_attempts=policy.max_attempts)
    delays = []
    for attempt in range(1, policy.max_attempts):
        job = claim(engine, "w1")
        assert job is not None
        assert (job.id, job.attempts) == (job_id, attempt)
        assert queue.fail(engine, job_id, "w1", f"boom {attempt}", policy) == "queued"
        row = job_row(engine, job_id)
        assert (row.state, row.lease_owner, row.last_error) == ("queued", None, f"boom {attempt}")
        # fail() stamps updated_at and run_after from the same clock reading.
        delays.append((row.run_after - row.updated_at).total_seconds())
        make_due(engine, job_id)
    for n, delay in enumerate(delays, start=1):
        nominal = policy.base_seconds * policy.factor ** (n - 1)
        assert nominal * 0.9 - 1e-3 <= delay <= nominal * 1.1 + 1e-3, (n, delays)
    assert delays == sorted(delays)
    assert len(set(delays)) == len(delays)

    job = claim(engine, "w1")
    assert job is not None
    assert job.attempts == policy.max_attempts
    assert queue.fail(engine, job_id, "w1", "boom last", policy) == "dead"
    row = job_row(engine, job_id)
    assert (row.state, row.attempts, row.last_error) == ("dead", 4, "boom last")
    assert row.finished_at is not None
    assert claim(engine, "w1") is None


def test_backoff_delay_is_capped() -> None:
    policy = RetryPolicy(base_seconds=1, factor=10, cap_seconds=5, max_attempts=9, jitter=0)
    assert [policy.delay(n) for n in (1, 2, 3, 8)] == [1, 5, 5, 5]


def test_permanent_failure_is_dead_at_once(engine: Engine) -> None:
    job_id = add(engine, "bad-input", max_attempts=5)
    assert claim(engine, "w1") is not None
    assert queue.fail(engine, job_id, "w1", "not an image", RetryPolicy(), permanent=True) == "dead"
    assert job_row(engine, job_id).state == "dead"


def test_retry_revives_a_dead_job_with_a_fresh_budget(engine: Engine) -> None:
    job_id = add(engine, "revive", max_attempts=1)
    assert claim(engine, "w1") is not None
    assert queue.fail(engine, job_id, "w1", "boom", RetryPolicy(max_attempts=1)) == "dead"
    assert queue.retry(engine, job_id)
    row = job_row(engine, job_id)
    assert (row.state, row.attempts, row.finished_at) == ("queued", 0, None)
    assert row.run_after <= utcnow()
    job = claim(engine, "w2")
    assert job is not None
    assert (job.id, job.attempts) == (job_id, 1)


def test_retry_leaves_live_jobs_alone(engine: Engine) -> None:
    running = add(engine, "running")
    assert claim(engine, "w1") is not None
    queued = add(engine, "queued")
    assert not queue.retry(engine, running)
    assert not queue.retry(engine, queued)
    assert (job_row(engine, running).state, job_row(engine, running).attempts) == ("running", 1)
    assert job_row(engine, queued).state == "queued"


def test_cancel_stops_a_queued_job(engine: Engine) -> None:
    job_id = add(engine, "unwanted")
    assert queue.cancel(engine, job_id)
    row = job_row(engine, job_id)
    assert row.state == "cancelled"
    assert row.finished_at is not None
    assert claim(engine, "w1") is None


def test_cancel_takes_the_lease_from_a_running_job(engine: Engine) -> None:
    job_id = add(engine, "stop-me")
    assert claim(engine, "w1") is not None
    assert queue.cancel(engine, job_id)
    assert not queue.heartbeat(engine, job_id, "w1", lease_seconds=60)
    with pytest.raises(LeaseLost), engine.begin() as conn:
        queue.complete(conn, job_id, "w1")
    assert queue.fail(engine, job_id, "w1", "late", RetryPolicy()) is None
    assert not queue.release(engine, job_id, "w1")
    row = job_row(engine, job_id)
    assert (row.state, row.lease_owner) == ("cancelled", None)
    assert queue.retry(engine, job_id)
    assert job_row(engine, job_id).state == "queued"


def test_cancel_does_not_touch_a_finished_job(engine: Engine) -> None:
    job_id = add(engine, "finished")
    assert claim(engine, "w1") is not None
    with engine.begin() as conn:
        queue.complete(conn, job_id, "w1")
    assert not queue.cancel(engine, job_id)
    assert job_row(engine, job_id).state == "done"


def test_live_lease_is_not_reaped(engine: Engine) -> None:
    job_id = add(engine, "busy")
    assert claim(engine, "w1", lease_seconds=60) is not None
    assert queue.reap_expired(engine) == 0
    assert job_row(engine, job_id).state == "running"


def test_expired_lease_on_the_last_attempt_is_buried(engine: Engine) -> None:
    job_id = add(engine, "last-chance", max_attempts=1)
    assert claim(engine, "w1", lease_seconds=0.05) is not None
    time.sleep(0.1)
    assert queue.reap_expired(engine) == 1
    row = job_row(engine, job_id)
    assert (row.state, row.lease_owner, row.last_error) == (
        "dead",
        None,
        "lease expired: worker lost",
    )


RACE_JOBS = 500
RACE_PROCESSES = 4


@pytest.mark.timeout(120)
def test_concurrent_claimers_take_every_job_exactly_once(engine: Engine, db_url: str) -> None:
    with engine.begin() as conn:
        for n in range(RACE_JOBS):
            queue.enqueue(conn, KIND, f"race-{n}", max_attempts=3)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(RACE_PROCESSES + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=claimers.claim_until_empty,
            args=(db_url, f"claimer-{n}", KIND, start, results),
        )
        for n in range(RACE_PROCESSES)
    ]
    for proc in procs:
        proc.start()
    try:
        start.wait(timeout=60)  # every claimer is connected; all go at once
        claimed = dict(results.get(timeout=90) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    assert [proc.exitcode for proc in procs] == [0] * RACE_PROCESSES

    every_id = [job_id for ids in claimed.values() for job_id in ids]
    assert len(every_id) == RACE_JOBS, "a job was claimed twice or not at all"
    assert len(set(every_id)) == RACE_JOBS, "a job was claimed twice"
    with engine.connect() as conn:
        rows = conn.execute(sa_select(Job.id, Job.state, Job.attempts, Job.lease_owner)).all()
    assert {r.id for r in rows} == set(every_id)
    assert {(r.state, r.attempts, r.lease_owner) for r in rows} == {("done", 1, None)}
    # More than one claimer got a share, so the claims really ran side by side. How the
    # shares split is the scheduler's business: SQLite's busy handler can starve one.
    assert sum(1 for ids in claimed.values() if ids) >= 2, {
        owner: len(ids) for owner, ids in claimed.items()
    }


def start_doomed_claimer(db_url: str, owner: str, lease_seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", claimers.__name__, db_url, owner, KIND, str(lease_seconds)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the claimer process said nothing"
    return proc.stdout.readline().strip()


@pytest.mark.timeout(60)
def test_job_of_a_killed_worker_is_reaped_and_claimed_again(engine: Engine, db_url: str) -> None:
    job_id = add(engine, "crashy")
    proc = start_doomed_claimer(db_url, "doomed", lease_seconds=2)
    try:
        assert read_line(proc, timeout=30) == str(job_id)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()

    row = job_row(engine, job_id)
    assert (row.state, row.lease_owner, row.attempts) == ("running", "doomed", 1)
    assert row.lease_expires_at is not None
    if (row.lease_expires_at - utcnow()).total_seconds() > 0.5:
        assert queue.reap_expired(engine) == 0, "a lease was reaped before it expired"
    assert claim(engine, "survivor") is None

    deadline = time.monotonic() + 10
    while (reaped := queue.reap_expired(engine)) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert reaped == 1
    assert utcnow() > row.lease_expires_at
    row = job_row(engine, job_id)
    assert (row.state, row.lease_owner, row.last_error) == (
        "queued",
        None,
        "lease expired: worker lost",
    )

    job = claim(engine, "survivor")
    assert job is not None
    assert (job.id, job.attempts, job.lease_owner) == (job_id, 2, "survivor")
    with engine.begin() as conn:
        queue.complete(conn, job_id, "survivor")
    assert job_row(engine, job_id).state == "done"


def test_leases_of_dead_processes_on_this_host_end_at_restart(engine: Engine) -> None:
    dead_job = add(engine, "held-by-a-dead-worker")
    live_job = add(engine, "held-by-a-live-worker")
    other_host_job = add(engine, "held-on-another-host")
    assert claim(engine, "box:4242:w0", lease_seconds=600).id == dead_job
    assert claim(engine, "box:5151:w1", lease_seconds=600).id == live_job
    assert claim(engine, "other:4242:w0", lease_seconds=600).id == other_host_job

    returned = queue.expire_leases_of_dead_owners(engine, "box", alive=lambda pid: pid == 5151)

    assert returned == 1
    assert job_row(engine, dead_job).state == "queued"
    assert job_row(engine, dead_job).lease_owner is None
    assert job_row(engine, live_job).state == "running"
    assert job_row(engine, other_host_job).state == "running"


def test_a_waiting_worker_is_woken_by_a_new_job_long_before_its_poll_interval(
    engine: Engine,
) -> None:
    import threading

    waiter = queue.JobWaiter(engine, poll_seconds=60)
    try:
        waiter.wait(timeout=0.05)  # settle: the fixture's own commits are behind us
        threading.Timer(0.3, add, args=(engine, "wake-me")).start()
        start = time.monotonic()
        waiter.wait(timeout=60)
        assert time.monotonic() - start < 30, "slept through the commit until the poll"
    finally:
        waiter.close()
    assert claim(engine, "w1") is not None
