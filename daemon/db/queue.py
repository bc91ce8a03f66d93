"""The durable job queue every stage shares: idempotent enqueue, atomic leased claims, retries."""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import select
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, func, text, update
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql, sqlite

from daemon.config import RetrySettings
from daemon.db.engine import is_sqlite
from daemon.db.schema import Job, JobState, utcnow

NOTIFY_CHANNEL = "pacs_ai_jobs"
MAX_ERROR_CHARS = 4000


class LeaseLost(Exception):
    """The job's lease passed to another owner; the caller's transaction must roll back."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, then dead after `max_attempts` attempts."""

    base_seconds: float = 30.0
    factor: float = 2.0
    cap_seconds: float = 3600.0
    max_attempts: int = 24
    jitter: float = 0.1

    @classmethod
    def from_settings(cls, settings: RetrySettings) -> RetryPolicy:
        return cls(**settings.model_dump())

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        base = min(self.cap_seconds, self.base_seconds * self.factor ** max(0, attempt - 1))
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, base * (1.0 + spread))


@dataclasses.dataclass(frozen=True)
class ClaimedJob:
    """What a worker holds while it runs a job."""

    id: int
    kind: str
    key: str
    study_id: int | None
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    lease_owner: str
    lease_expires_at: dt.datetime


def dialect_insert(conn: Connection) -> Any:
    """The engine's INSERT with ON CONFLICT (SQLite's or PostgreSQL's)."""
    return sqlite.insert if conn.dialect.name == "sqlite" else postgresql.insert


def enqueue(
    conn: Connection,
    kind: str,
    key: str,
    *,
    max_attempts: int,
    payload: dict[str, Any] | None = None,
    study_id: int | None = None,
    run_after: dt.datetime | None = None,
) -> int:
    """Add a job unless one with `key` exists; return its id either way (idempotent)."""
    now = utcnow()
    stmt = (
        dialect_insert(conn)(Job)
        .values(
            kind=kind,
            key=key,
            study_id=study_id,
            payload=payload or {},
            state=JobState.QUEUED,
            attempts=0,
            max_attempts=max_attempts,
            run_after=run_after or now,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=["key"])
    )
    conn.execute(stmt)
    if conn.dialect.name == "postgresql":
        conn.execute(
            text("SELECT pg_notify(:channel, :kind)"), {"channel": NOTIFY_CHANNEL, "kind": kind}
        )
    return int(conn.execute(sa_select(Job.id).where(Job.key == key)).scalar_one())


def claim(
    engine: Engine, owner: str, kinds: Sequence[str], lease_seconds: float
) -> ClaimedJob | None:
    """Take the oldest due job of `kinds` with a lease, atomically, or None."""
    now = utcnow()
    candidate = (
        sa_select(Job.id)
        .where(Job.state == JobState.QUEUED, Job.run_after <= now, Job.kind.in_(list(kinds)))
        .order_by(Job.run_after, Job.id)
        .limit(1)
    )
    return _take(engine, candidate, owner, lease_seconds, now)


def claim_key(engine: Engine, key: str, owner: str, lease_seconds: float) -> ClaimedJob | None:
    """Take the queued job named `key` now, due or not, or None when it is not queued.

    For work whose first attempt belongs to the process that queued it (the receiver
    answering on the association it holds); anyone claims it once it falls due.
    """
    candidate = sa_select(Job.id).where(Job.key == key, Job.state == JobState.QUEUED)
    return _take(engine, candidate, owner, lease_seconds, utcnow())


def _take(
    engine: Engine, candidate: Any, owner: str, lease_seconds: float, now: dt.datetime
) -> ClaimedJob | None:
    """Lease the job `candidate` selects (one id), atomically, or None."""
    if not is_sqlite(engine):
        candidate = candidate.with_for_update(skip_locked=True)
    expires = now + dt.timedelta(seconds=lease_seconds)
    stmt = (
        update(Job)
        .where(Job.id == candidate.scalar_subquery())
        .values(
            state=JobState.RUNNING,
            attempts=Job.attempts + 1,
            lease_owner=owner,
            lease_expires_at=expires,
            updated_at=now,
        )
        .returning(
            Job.id, Job.kind, Job.key, Job.study_id, Job.payload, Job.attempts, Job.max_attempts
        )
    )
    # On SQLite the engine opens every transaction with BEGIN IMMEDIATE, so the subselect
    # and the update run under the write lock; on PostgreSQL SKIP LOCKED keeps claimers apart.
    with engine.begin() as conn:
        row = conn.execute(stmt).one_or_none()
    if row is None:
        return None
    return ClaimedJob(
        id=row.id,
        kind=row.kind,
        key=row.key,
        study_id=row.study_id,
        payload=dict(row.payload or {}),
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        lease_owner=owner,
        lease_expires_at=expires,
    )


def _owned(job_id: int, owner: str) -> Any:
    return (Job.id == job_id) & (Job.lease_owner == owner) & (Job.state == JobState.RUNNING)


def heartbeat(engine: Engine, job_id: int, owner: str, lease_seconds: float) -> bool:
    """Extend the lease; False when it was lost (reaped or cancelled)."""
    now = utcnow()
    with engine.begin() as conn:
        res = conn.execute(
            update(Job)
            .where(_owned(job_id, owner))
            .values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds), updated_at=now)
        )
    return res.rowcount == 1


def complete(conn: Connection, job_id: int, owner: str) -> None:
    """Mark done inside the caller's transaction, so results and completion commit together."""
    now = utcnow()
    res = conn.execute(
        update(Job)
        .where(_owned(job_id, owner))
        .values(
            state=JobState.DONE,
            lease_owner=None,
            lease_expires_at=None,
            last_error=None,
            finished_at=now,
            updated_at=now,
        )
    )
    if res.rowcount != 1:
        raise LeaseLost(f"job {job_id}: lease no longer held by {owner}")


def fail(
    engine: Engine,
    job_id: int,
    owner: str,
    error: str,
    policy: RetryPolicy,
    *,
    permanent: bool = False,
) -> JobState | None:
    """Record a failed attempt: back to the queue after a backoff, or dead.

    Returns the job's new state, or None when the lease had already passed to another owner.
    """
    now = utcnow()
    with engine.begin() as conn:
        row = conn.execute(
            sa_select(Job.attempts, Job.max_attempts).where(_owned(job_id, owner))
        ).one_or_none()
        if row is None:
            return None
        dead = permanent or row.attempts >= row.max_attempts
        values: dict[str, Any] = {
            "lease_owner": None,
            "lease_expires_at": None,
            "last_error": error[:MAX_ERROR_CHARS],
            "updated_at": now,
        }
        if dead:
            values.update(state=JobState.DEAD, finished_at=now)
        else:
            values.update(
                state=JobState.QUEUED,
                run_after=now + dt.timedelta(seconds=policy.delay(row.attempts)),
            )
        conn.execute(update(Job).where(_owned(job_id, owner)).values(**values))
    return JobState.DEAD if dead else JobState.QUEUED


def release(engine: Engine, job_id: int, owner: str) -> bool:
    """Give a job back untouched (graceful shutdown): the attempt does not count."""
    now = utcnow()
    with engine.begin() as conn:
        res = conn.execute(
            update(Job)
            .where(_owned(job_id, owner))
            .values(
                state=JobState.QUEUED,
                attempts=Job.attempts - 1,
                lease_owner=None,
                lease_expires_at=None,
                run_after=now,
                updated_at=now,
            )
        )
    return res.rowcount == 1


# The states from which an operator may cancel or retry a job (`jobs cancel|retry`, the
# console's buttons).
CANCELLABLE = (JobState.QUEUED, JobState.RUNNING, JobState.DEAD)
RETRYABLE = (JobState.DEAD, JobState.CANCELLED)


def cancel(engine: Engine, job_id: int) -> bool:
    """Stop a job for good (operator's decision); a running worker loses its lease."""
    now = utcnow()
    with engine.begin() as conn:
        res = conn.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.in_(CANCELLABLE))
            .values(
                state=JobState.CANCELLED,
                lease_owner=None,
                lease_expires_at=None,
                finished_at=now,
                updated_at=now,
            )
        )
    return res.rowcount == 1


def retry(engine: Engine, job_id: int) -> bool:
    """Revive a dead or cancelled job with a fresh attempt budget."""
    now = utcnow()
    with engine.begin() as conn:
        res = conn.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.in_(RETRYABLE))
            .values(
                state=JobState.QUEUED, attempts=0, run_after=now, finished_at=None, updated_at=now
            )
        )
        if res.rowcount == 1 and conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_notify(:c, 'retry')"), {"c": NOTIFY_CHANNEL})
    return res.rowcount == 1


def reap_expired(engine: Engine) -> int:
    """Return jobs whose lease expired (their worker died) to the queue, or bury them."""
    now = utcnow()
    expired = (Job.state == JobState.RUNNING) & (Job.lease_expires_at < now)
    cleared = {"lease_owner": None, "lease_expires_at": None, "updated_at": now}
    with engine.begin() as conn:
        dead = conn.execute(
            update(Job)
            .where(expired & (Job.attempts >= Job.max_attempts))
            .values(
                state=JobState.DEAD,
                finished_at=now,
                last_error="lease expired: worker lost",
                **cleared,
            )
        ).rowcount
        requeued = conn.execute(
            update(Job)
            .where(expired)
            .values(
                state=JobState.QUEUED,
                run_after=now,
                last_error="lease expired: worker lost",
                **cleared,
            )
        ).rowcount
    return dead + requeued


def expire_leases_of_dead_owners(engine: Engine, host: str, alive: Callable[[int], bool]) -> int:
    """End the leases this host's dead processes held, so a restart resumes at once.

    Owners are `host:pid:name`; a lease whose pid is not alive on this host can never be
    renewed. Without this a restarted service waits out the whole lease.
    """
    now = utcnow()
    with engine.begin() as conn:
        rows = conn.execute(
            sa_select(Job.id, Job.lease_owner).where(
                Job.state == JobState.RUNNING, Job.lease_owner.like(f"{host}:%")
            )
        ).all()
        dead = [
            (row.id, row.lease_owner)
            for row in rows
            if row.lease_owner.split(":")[1].isdigit()
            and not alive(int(row.lease_owner.split(":")[1]))
        ]
        for job_id, owner in dead:
            conn.execute(update(Job).where(_owned(job_id, owner)).values(lease_expires_at=now))
    if dead:
        reap_expired(engine)
    return len(dead)


def counts_by_kind_and_state(
    conn: Connection, states: Sequence[str] | None = None
) -> dict[str, dict[str, int]]:
    """Job counts for status and metrics; `states` limits them (an index range, not a scan)."""
    out: dict[str, dict[str, int]] = {}
    stmt = sa_select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)
    if states is not None:
        stmt = stmt.where(Job.state.in_(list(states)))
    rows = conn.execute(stmt)
    for kind, state, n in rows:
        out.setdefault(kind, {})[state] = n
    return out


def oldest_queued_age(conn: Connection) -> float | None:
    """Seconds the oldest due job has waited, or None when nothing waits."""
    now = utcnow()
    oldest = conn.execute(
        sa_select(func.min(Job.run_after)).where(Job.state == JobState.QUEUED, Job.run_after <= now)
    ).scalar_one_or_none()
    if oldest is None:
        return None
    if oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=dt.UTC)
    return max(0.0, (now - oldest).total_seconds())


# How often a waiter on SQLite looks whether anything committed (a stat, no query).
COMMIT_CHECK_SECONDS = 0.01


def _wal_stamp(wal: Path) -> tuple[int, int] | None:
    """What changes whenever a connection commits to a database in WAL mode."""
    try:
        st = wal.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


class JobWaiter:
    """Sleeps until a job may be due: PostgreSQL NOTIFY wakes it at once; on SQLite a commit
    by any process (its write-ahead log changing) wakes it, and it polls at most briefly."""

    def __init__(self, engine: Engine, poll_seconds: float) -> None:
        self._poll = poll_seconds
        self._conn: psycopg.Connection[Any] | None = None
        self._wal: Path | None = None
        if is_sqlite(engine):
            database = engine.url.database
            if database and database != ":memory:":
                self._wal = Path(f"{database}-wal")
        else:
            url = engine.url.set(drivername="postgresql")
            dsn = url.render_as_string(hide_password=False)
            self._conn = psycopg.connect(dsn, autocommit=True)
            self._conn.execute(f"LISTEN {NOTIFY_CHANNEL}")

    def wait(self, timeout: float) -> None:
        """Return when woken or after `timeout` seconds (SQLite: at most `poll_seconds`)."""
        if self._conn is None:
            self._wait_for_commit(min(timeout, self._poll))
            return
        ready, _, _ = select.select([self._conn.fileno()], [], [], timeout)
        if ready:
            for _ in self._conn.notifies(timeout=0):
                pass

    def _wait_for_commit(self, seconds: float) -> None:
        if self._wal is None:
            time.sleep(seconds)
            return
        deadline = time.monotonic() + seconds
        before = _wal_stamp(self._wal)
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(COMMIT_CHECK_SECONDS, left))
            if _wal_stamp(self._wal) != before:
                return

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def waiting_for_retry(conn: Connection, limit: int = 10) -> tuple[int, list[Any]]:
    """Jobs a failed attempt sent back to wait for their next try: how many, and the soonest
    `limit` of them (id, kind, key, attempts, max_attempts, run_after, last_error, payload)."""
    now = utcnow()
    waiting = (Job.state == JobState.QUEUED) & (Job.attempts > 0) & (Job.run_after > now)
    total = conn.execute(sa_select(func.count(Job.id)).where(waiting)).scalar_one()
    rows = conn.execute(
        sa_select(
            Job.id,
            Job.kind,
            Job.key,
            Job.attempts,
            Job.max_attempts,
            Job.run_after,
            Job.last_error,
            Job.payload,
        )
        .where(waiting)
        .order_by(Job.run_after)
        .limit(limit)
    ).all()
    return int(total), list(rows)


def next_attempt_at(engine: Engine, job_id: int) -> dt.datetime | None:
    """When a queued job may run next (None when it is not queued)."""
    with engine.connect() as conn:
        return conn.execute(
            sa_select(Job.run_after).where(Job.id == job_id, Job.state == JobState.QUEUED)
        ).scalar_one_or_none()


def requeue(conn: Connection, key: str) -> bool:
    """Queue the finished job with `key` again, its attempts from zero (an operator's resend);
    False when it is queued or running already, or does not exist."""
    now = utcnow()
    res = conn.execute(
        update(Job)
        .where(Job.key == key, Job.state.in_((JobState.DONE, JobState.DEAD, JobState.CANCELLED)))
        .values(state=JobState.QUEUED, attempts=0, run_after=now, finished_at=None, updated_at=now)
    )
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_notify(:c, 'requeue')"), {"c": NOTIFY_CHANNEL})
    return res.rowcount == 1
