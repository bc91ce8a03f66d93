"""Delivery verification state transitions, on SQLite and PostgreSQL.

sent -> confirmed (commitment success, C-FIND match); sent -> pending with one more
`dispatch` job (commitment failure, or `TRIES_PER_SEND` unconfirmed verify attempts);
a verify job that dies leaves the row `sent` (unconfirmed), never `dead`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import Comprehensive3DSRStorage, EnhancedSRStorage, generate_uid
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from daemon.config import Settings
from daemon.context import JobHandler, WorkerContext
from daemon.db import migrate, queue
from daemon.db.deliveries import (
    APPLIED_CONFIRMED,
    APPLIED_RESENT,
    APPLIED_UNKNOWN,
    apply_commitment_report,
)
from daemon.db.engine import make_engine
from daemon.db.keys import VERIFY, resend_key, verify_key
from daemon.db.queue import ClaimedJob, RetryPolicy
from daemon.db.schema import Dispatch, Job, Study
from daemon.dicom.commitment import CommitmentReport
from daemon.dispatch.job import run_dispatch
from daemon.dispatch.verify import (
    CONFIRMED,
    NOT_FOUND,
    RESENT,
    SENDS_BEFORE_GIVING_UP,
    SETTLED,
    TRIES_PER_SEND,
    VerifyFailed,
    VerifyOutcome,
    VerifyPending,
    run_verify,
    settle,
)
from daemon.spool import Spool
from daemon.worker import run_one
from tests.peers import RecordingSCP, free_port
from tests.unit.dispatch.dicomfiles import add_dispatch
from tests.unit.dispatch.test_verify_peer import CommitmentPeer

OWNER = "verify-test"
# Requeue at once: the tests claim the next attempt without waiting out a backoff.
NO_WAIT = RetryPolicy(base_seconds=0.0, jitter=0.0)
# A placeholder: `send` points the destination at a fresh recording peer.
SEND_PORT = 104


@pytest.fixture
def db(db_url: str) -> Iterator[Engine]:
    """A database at head, once on SQLite and once on PostgreSQL."""
    eng = make_engine(db_url)
    migrate.upgrade(eng)
    yield eng
    eng.dispose()


def settings_for(tmp_path: Path, port: int, verify: str, ae_title: str = "RECORDER") -> Settings:
    return Settings(
        dicom={"ae_title": "PACSAI"},
        storage={"spool_dir": str(tmp_path / "spool")},
        retry={"max_attempts": 5},
        destinations=[
            {
                "name": "pacs",
                "ae_title": ae_title,
                "host": "127.0.0.1",
                "port": port,
                "verify": verify,
            }
        ],
    )


def claim(engine: Engine, kind: str) -> ClaimedJob:
    job = queue.claim(engine, OWNER, [kind], lease_seconds=60)
    assert job is not None, f"no {kind} job due"
    return job


def row(engine: Engine, dispatch_id: int) -> Dispatch:
    with Session(engine) as session:
        found = session.get(Dispatch, dispatch_id)
        assert found is not None
        return found


def jobs(engine: Engine, kind: str) -> list[Job]:
    with Session(engine) as session:
        return list(session.scalars(select(Job).where(Job.kind == kind).order_by(Job.id)))


def send(engine: Engine, settings: Settings, port_classes: list[str] | None = None) -> None:
    """Run the due dispatch job against a peer that takes the report."""
    with RecordingSCP(port_classes or [Comprehensive3DSRStorage, EnhancedSRStorage]) as scp:
        pinned = settings.model_copy(
            update={
                "destinations": [settings.destinations[0].model_copy(update={"port": scp.port})]
            }
        )
        run_dispatch(engine, claim(engine, "dispatch"), pinned)


def fail_attempt(engine: Engine, job: ClaimedJob, exc: Exception) -> str:
    """What the worker does with a handler's exception (retryable or not)."""
    permanent = getattr(exc, "retryable", True) is False
    return queue.fail(engine, job.id, OWNER, str(exc), NO_WAIT, permanent=permanent)


# --- the send queues the verify step --------------------------------------------------


@pytest.mark.parametrize("verify", ["find", "commitment"])
def test_send_to_a_verifying_destination_queues_verify_in_the_same_commit(
    db: Engine, sr_pair: tuple[Path, Path], tmp_path: Path, verify: str
) -> None:
    dispatch_id = add_dispatch(db, *sr_pair, destination="pacs")
    send(db, settings_for(tmp_path, SEND_PORT, verify))
    sent = row(db, dispatch_id)
    assert sent.state == "sent" and sent.attempts == 1
    assert (sent.transaction_uid is not None) == (verify == "commitment")
    (job,) = jobs(db, "verify")
    assert job.key == verify_key(dispatch_id, 1)
    assert job.state == "queued"
    assert job.max_attempts == TRIES_PER_SEND
    assert job.payload["send_attempt"] == 1
    assert job.payload["sop_class_uid"] == Comprehensive3DSRStorage
    assert job.payload["sop_instance_uid"]


def test_send_to_a_destination_without_verify_is_final(
    db: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    dispatch_id = add_dispatch(db, *sr_pair, destination="pacs")
    send(db, settings_for(tmp_path, SEND_PORT, "none"))
    assert row(db, dispatch_id).state == "sent"
    assert row(db, dispatch_id).transaction_uid is None
    assert jobs(db, "verify") == []


def test_fallback_send_is_verified_by_the_fallback_instance(
    db: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    add_dispatch(db, *sr_pair, destination="pacs")
    send(db, settings_for(tmp_path, SEND_PORT, "find"), [EnhancedSRStorage])
    (job,) = jobs(db, "verify")
    assert job.payload["sop_class_uid"] == EnhancedSRStorage


# --- outcomes of one verify attempt ---------------------------------------------------


def sent_row(db: Engine, sr_pair: tuple[Path, Path], tmp_path: Path, verify: str) -> int:
    dispatch_id = add_dispatch(db, *sr_pair, destination="pacs")
    send(db, settings_for(tmp_path, SEND_PORT, verify))
    return dispatch_id


def test_confirmation_marks_the_row_confirmed_and_the_job_done(
    db: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    dispatch_id = sent_row(db, sr_pair, tmp_path, "find")
    job = claim(db, "verify")
    outcome = VerifyOutcome(CONFIRMED, "found by C-FIND on pacs")
    settings = settings_for(tmp_path, SEND_PORT, "find")
    assert settle(db, job, dispatch_id, 1, outcome, settings) == SETTLED
    confirmed = row(db, dispatch_id)
    assert confirmed.state == "confirmed"
    assert confirmed.confirmed_at is not None
    assert confirmed.last_status == "found by C-FIND on pacs"
    assert jobs(db, "verify")[0].state == "done"


def test_unconfirmed_attempts_retry_then_the_report_is_sent_again(
    db: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, SEND_PORT, "find")
    dispatch_id = sent_row(db, sr_pair, tmp_path, "find")
    not_found = VerifyOutcome(NOT_FOUND, "not found on pacs")
    for attempt in range(1, TRIES_PER_SEND):
        job = claim(db, "verify")
        assert job.attempts == attempt
        with pytest.raises(VerifyPending) as info:
            settle(db, job, dispatch_id, 1, not_found, settings)
        assert fail_attempt(db, job, info.value) == "queued"
        assert row(db, dispatch_id).verify_attempts == attempt
        assert row(db, dispatch_id).state == "sent"
    last = claim(db, "verify")
    assert settle(db, last, dispatch_id, 1, not_found, settings) == RESENT
    resent = row(db, dispatch_id)
    assert resent.state == "pending"
    assert resent.verify_attempts == TRIES_PER_SEND
    assert "not confirmed after 3 verify attempts" in (resent.last_status or "")
    assert jobs(db, "verify")[0].state == "done"
    dispatch_jobs = {j.key: j for j in jobs(db, "dispatch")}
    again = dispatch_jobs[resend_key(dispatch_id, 1)]
    assert again.state == "queued" and again.max_attempts == settings.retry.max_attempts
    # The resend goes out and is verified by a job of its own, with a new transaction.
    send(db, settings)
    second = row(db, dispatch_id)
    assert second.state == "sent" and second.attempts == 2
    assert [j.key for j in jobs(db, "verify")] == [
        verify_key(dispatch_id, 1),
        verify_key(dispatch_id, 2),
    ]


def test_verify_gives_up_after_the_sends_budget_and_leaves_the_row_sent(
    db: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, SEND_PORT, "find")
    dispatch_id = sent_row(db, sr_pair, tmp_path, "find")
    not_found = VerifyOutcome(NOT_FOUND, "not found on pacs")
    for send_attempt in range(1, SENDS_BEFORE_GIVING_UP + 1):
        for _ in range(TRIES_PER_SEND - 1):
            job = claim(db, "verify")
            with pytest.raises(VerifyPending) as pending:
                settle(db, job, dispatch_id, send_attempt, not_found, settings)
            fail_attempt(db, job, pending.value)
        job = claim(db, "verify")
        if send_attempt < SENDS_BEFORE_GIVING_UP:
            assert settle(db, job, dispatch_id, send_attempt, not_found, settings) == RESENT
            send(db, settings)
            continue
        with pytest.raises(VerifyFailed) as failed:
            settle(db, job, dispatch_id, send_attempt, not_found, settings)
        assert not failed.value.retryable
        assert fail_attempt(db, job, failed.value) == "dead"
    given_up = row(db, dispatch_id)
    assert given_up.state == "sent"  # delivered, never confirmed: status counts it
    assert given_up.verify_attempts == TRIES_PER_SEND * SENDS_BEFORE_GIVING_UP
    assert given_up.attempts == SENDS_BEFORE_GIVING_UP


def test_a_stale_verify_changes_nothing(
    db: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, SEND_PORT, "find")
    dispatch_id = sent_row(db, sr_pair, tmp_path, "find")
    job = claim(db, "verify")
    # A verify for send 1 after send 2 went out: the row is not the send it verifies.
    outcome = VerifyOutcome(CONFIRMED, "found")
    assert settle(db, job, dispatch_id, 7, outcome, settings) == SETTLED
    assert row(db, dispatch_id).state == "sent"
    assert row(db, dispatch_id).verify_attempts == 0


# --- storage commitment reports (either association) ----------------------------------


def test_commitment_success_report_confirms_the_sent_row(
    db: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    dispatch_id = sent_row(db, sr_pair, tmp_path, "commitment")
    transaction = row(db, dispatch_id).transaction_uid
    assert transaction
    report = CommitmentReport(transaction, 1, committed=("1.2.3",))
    with db.begin() as conn:
        done = apply_commitment_report(conn, report, resend_max_attempts=5)
    assert done == (APPLIED_CONFIRMED, dispatch_id)
    assert row(db, dispatch_id).state == "confirmed"
    assert row(db, dispatch_id).confirmed_at is not None
    # The verify job then finds nothing left to do, without asking the PACS.
    closed = settings_for(tmp_path, free_port(), "commitment")
    run_verify(db, claim(db, "verify"), closed)
    assert jobs(db, "verify")[0].state == "done"


def test_commitment_failure_report_sends_the_report_again(
    db: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    dispatch_id = sent_row(db, sr_pair, tmp_path, "commitment")
    first = row(db, dispatch_id).transaction_uid
    assert first
    report = CommitmentReport(first, 2, failed=(("1.2.3", 0x0112),))
    with db.begin() as conn:
        done = apply_commitment_report(conn, report, resend_max_attempts=5)
    assert done == (APPLIED_RESENT, dispatch_id)
    pending = row(db, dispatch_id)
    assert pending.state == "pending"
    assert "0x0112 no such object instance" in (pending.last_status or "")
    assert resend_key(dispatch_id, 1) in {j.key for j in jobs(db, "dispatch")}
    # A second report on the same transaction queues nothing more.
    with db.begin() as conn:
        assert apply_commitment_report(conn, report, resend_max_attempts=5)[0] == APPLIED_UNKNOWN
    send(db, settings_for(tmp_path, SEND_PORT, "commitment"))
    again = row(db, dispatch_id)
    assert again.state == "sent" and again.transaction_uid not in (None, first)
    # A late report about the first send no longer settles anything.
    late = CommitmentReport(first, 1, committed=("1.2.3",))
    with db.begin() as conn:
        assert apply_commitment_report(conn, late, resend_max_attempts=5)[0] == APPLIED_UNKNOWN
    assert row(db, dispatch_id).state == "sent"


def test_unknown_transaction_changes_nothing(db: Engine) -> None:
    with db.begin() as conn:
        done = apply_commitment_report(
            conn, CommitmentReport(generate_uid(), 1), resend_max_attempts=5
        )
    assert done == (APPLIED_UNKNOWN, None)


# --- the whole verify job against a peer ----------------------------------------------


def test_verify_job_confirms_by_inline_commitment_report(
    db: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    dispatch_id = sent_row(db, sr_pair, tmp_path, "commitment")
    job = claim(db, "verify")
    with CommitmentPeer({job.payload["sop_instance_uid"]}) as pacs:
        run_verify(db, job, settings_for(tmp_path, pacs.port, "commitment", pacs.aet))
    (action,) = pacs.actions
    assert action.TransactionUID == row(db, dispatch_id).transaction_uid
    assert row(db, dispatch_id).state == "confirmed"
    assert jobs(db, "verify")[0].state == "done"


def test_verify_job_resends_on_inline_commitment_failure(
    db: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    dispatch_id = sent_row(db, sr_pair, tmp_path, "commitment")
    job = claim(db, "verify")
    with CommitmentPeer(set()) as pacs:
        run_verify(db, job, settings_for(tmp_path, pacs.port, "commitment", pacs.aet))
    assert row(db, dispatch_id).state == "pending"
    assert resend_key(dispatch_id, 1) in {j.key for j in jobs(db, "dispatch")}
    assert jobs(db, "verify")[0].state == "done"


def test_verify_job_confirms_by_find(
    db: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    dispatch_id = sent_row(db, sr_pair, tmp_path, "find")
    job = claim(db, "verify")
    with CommitmentPeer({job.payload["sop_instance_uid"]}) as pacs:
        run_verify(db, job, settings_for(tmp_path, pacs.port, "find", pacs.aet))
    (query,) = pacs.queries
    with Session(db) as session:
        study_uid = session.scalars(select(Study.study_uid)).one()
    assert query.StudyInstanceUID == study_uid
    assert row(db, dispatch_id).state == "confirmed"


def test_awaiting_report_is_pending_and_counted(
    db: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    dispatch_id = sent_row(db, sr_pair, tmp_path, "commitment")
    job = claim(db, "verify")
    with CommitmentPeer(set(), inline_report=False) as pacs:
        with pytest.raises(VerifyPending):
            run_verify(
                db,
                job,
                settings_for(tmp_path, pacs.port, "commitment", pacs.aet),
                report_wait_seconds=0.1,
            )
    assert row(db, dispatch_id).state == "sent"
    assert row(db, dispatch_id).verify_attempts == 1


def test_destination_without_the_service_is_a_permanent_failure(
    db: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    dispatch_id = sent_row(db, sr_pair, tmp_path, "commitment")
    with CommitmentPeer(set(), commitment=False) as pacs:
        with pytest.raises(VerifyFailed) as info:
            run_verify(
                db, claim(db, "verify"), settings_for(tmp_path, pacs.port, "commitment", pacs.aet)
            )
    assert not info.value.retryable
    assert "set verify = 'find' or 'none'" in str(info.value)
    assert row(db, dispatch_id).state == "sent"


def test_unknown_destination_is_a_permanent_failure(
    db: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    sent_row(db, sr_pair, tmp_path, "find")
    other = Settings(storage={"spool_dir": str(tmp_path / "spool")})
    with pytest.raises(VerifyFailed) as info:
        run_verify(db, claim(db, "verify"), other)
    assert not info.value.retryable


def test_worker_retries_an_unconfirmed_verify_and_never_marks_the_row_dead(
    db: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    dispatch_id = sent_row(db, sr_pair, tmp_path, "find")
    closed = settings_for(tmp_path, free_port(), "find")
    ctx = WorkerContext(
        settings=closed, engine=db, spool=Spool(tmp_path / "spool"), owner=OWNER, policy=NO_WAIT
    )

    def verify(c: WorkerContext, j: ClaimedJob) -> None:
        run_verify(c.engine, j, c.settings)

    assert run_one(ctx, {VERIFY: JobHandler(verify)})
    (job,) = jobs(db, "verify")
    assert job.state == "queued" and job.attempts == 1
    assert "could not connect" in (job.last_error or "")
    assert row(db, dispatch_id).state == "sent"
