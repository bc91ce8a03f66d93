"""The audit trail: an append-only hash chain of what happened to each study, without PHI.

Each row's `hash` is the SHA-256 of its content (created_at, event, study_uid, detail) and
the previous row's hash, so changing or deleting a row breaks every link after it.
`record` appends inside the caller's transaction; on PostgreSQL it first takes a
transaction-scoped advisory lock so concurrent appenders never read the same tail
(SQLite transactions are serialized already: every one begins IMMEDIATE).

Lock order: call `record` as the last write of a transaction (after every row lock the
transaction needs), so a holder of the audit lock never waits for a row and no deadlock
can form. The detail holds only UIDs, model names and hashes, destination names, job ids.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, insert, select, text

from daemon.db.schema import AuditEvent, utcnow

GENESIS_HASH = "0" * 64
# pg_advisory_xact_lock key of the chain's tail: "pacsaudt" as a 64-bit integer.
ADVISORY_LOCK_KEY = 0x7061637361756474

# Event names: one home, so reports and tests spell them the same way.
STUDY_RECEIVED = "study received"
ANALYSED = "analysed"
SR_DELIVERED = "sr delivered"
JOB_RETRIED = "job retried by operator"
JOB_CANCELLED = "job cancelled by operator"
REPLAY_REQUESTED = "replay requested"
REPORT_SEND_REQUESTED = "report send requested by operator"
SPOOL_PURGED = "spool purged"


def _iso(value: dt.datetime) -> str:
    """One spelling of a timestamp, identical before storing and after reading back."""
    return value.astimezone(dt.UTC).isoformat(timespec="microseconds")


def canonical(
    created_at: dt.datetime, event: str, study_uid: str | None, detail: dict[str, Any], prev: str
) -> bytes:
    """The bytes a row's hash covers: id-independent, key-sorted, no whitespace."""
    return json.dumps(
        [_iso(created_at), event, study_uid, detail, prev],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()


def row_hash(
    created_at: dt.datetime, event: str, study_uid: str | None, detail: dict[str, Any], prev: str
) -> str:
    """The hash a row must carry for its content and predecessor."""
    return hashlib.sha256(canonical(created_at, event, study_uid, detail, prev)).hexdigest()


def _lock_tail(conn: Connection) -> None:
    """Serialize appenders until commit (PostgreSQL; SQLite's BEGIN IMMEDIATE already does)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})


def record(conn: Connection, event: str, *, study_uid: str | None = None, **detail: Any) -> str:
    """Append one event in the caller's transaction; returns its hash."""
    _lock_tail(conn)
    prev = conn.execute(
        select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)
    ).scalar_one_or_none()
    prev = prev or GENESIS_HASH
    # A JSON round trip now, so the hash covers exactly what the database gives back.
    stored = json.loads(json.dumps(detail, sort_keys=True))
    created_at = utcnow()
    digest = row_hash(created_at, event, study_uid, stored, prev)
    conn.execute(
        insert(AuditEvent).values(
            created_at=created_at,
            event=event,
            study_uid=study_uid,
            detail=stored,
            prev_hash=prev,
            hash=digest,
        )
    )
    return digest


def record_studies_received(conn: Connection, study_uids: Iterable[str]) -> int:
    """Audit each study the trail has not seen yet (its first instance); returns how many.

    Cheap when nothing is new: one indexed look-up, no lock. The receiver's upsert holds the
    study row until commit, so a second transaction for the same new study sees this one's row.
    """
    wanted = sorted(set(study_uids))
    if not wanted:
        return 0
    seen = set(
        conn.execute(
            select(AuditEvent.study_uid).where(
                AuditEvent.event == STUDY_RECEIVED, AuditEvent.study_uid.in_(wanted)
            )
        ).scalars()
    )
    new = [uid for uid in wanted if uid not in seen]
    for uid in new:
        record(conn, STUDY_RECEIVED, study_uid=uid)
    return len(new)


@dataclasses.dataclass(frozen=True)
class ChainCheck:
    """What walking the chain found: the row count, or the first broken row and why."""

    rows: int
    broken_id: int | None = None
    reason: str | None = None
    # The last intact row, where a later walk may resume (`verify(conn, since=check)`).
    last_id: int | None = None
    last_hash: str = GENESIS_HASH

    @property
    def intact(self) -> bool:
        """Whether every row matched its content and its predecessor."""
        return self.broken_id is None

    def __str__(self) -> str:
        """The line `pacs-ai audit verify` prints."""
        if self.intact:
            return f"audit chain intact: {self.rows} rows"
        return f"audit row {self.broken_id} is broken: {self.reason}"


def verify(conn: Connection, since: ChainCheck | None = None) -> ChainCheck:
    """Walk the chain in id order; stop at the first row whose hash or link does not hold.

    `since`, an intact earlier check, resumes after its last row (the rows it covered are
    not read again): what a page that shows the chain's state calls each time.
    """
    stmt = select(
        AuditEvent.id,
        AuditEvent.created_at,
        AuditEvent.event,
        AuditEvent.study_uid,
        AuditEvent.detail,
        AuditEvent.prev_hash,
        AuditEvent.hash,
    )
    prev_id: int | None = None
    prev_hash = GENESIS_HASH
    count = 0
    if since is not None and since.intact and since.last_id is not None:
        stmt = stmt.where(AuditEvent.id > since.last_id)
        prev_id, prev_hash, count = since.last_id, since.last_hash, since.rows
    rows = conn.execute(stmt.order_by(AuditEvent.id).execution_options(yield_per=1000))
    for row in rows:
        if row.prev_hash != prev_hash:
            where = "the start of the chain" if prev_id is None else f"row {prev_id}"
            return ChainCheck(count, row.id, f"prev_hash does not match {where}")
        expected = row_hash(row.created_at, row.event, row.study_uid, row.detail or {}, prev_hash)
        if row.hash != expected:
            return ChainCheck(count, row.id, "hash does not match its content")
        prev_id, prev_hash = row.id, row.hash
        count += 1
    return ChainCheck(count, last_id=prev_id, last_hash=prev_hash)
