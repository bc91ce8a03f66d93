"""Storage Commitment Push Model as SCP (PS3.4 J): a modality asks us to keep its images.

A modality that wants to free its disk sends an N-ACTION naming the instances it sent
us under a Transaction UID. We answer at once (N-ACTION-RSP), after the request and its
`commitment-report` job are committed rows; the N-EVENT-REPORT follows: success for each
instance stored durably here with the same SOP class, failure 0x0112 (no such object
instance) or 0x0119 (class/instance conflict) for the rest.

Who sends the report: the receiver process that took the N-ACTION claims the job at once
(`queue.claim_key`) and reports on the modality's own association when the modality keeps
it open, else on a new association to the modality's `[[sources]]` entry, proposing the
SCP role by role selection (the requestor of that association is the SCP of the service).
A report that cannot be delivered goes back to the queue and is retried by any worker
with the `[retry]` policy; a crash at any point leaves the job to be claimed again, so a
report is sent at least once, and once in all but a crash between sending and recording.

The other direction, reports a PACS sends about *our* SRs (`verify = "commitment"`),
is daemon.receive.commitment.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StorageCommitmentPushModel
from sqlalchemy import Connection, Engine, select

from daemon.config import Settings, Source
from daemon.context import WorkerContext
from daemon.db import commitments, queue
from daemon.db.commitments import Failure, Reference
from daemon.db.schema import CommitmentState, Instance, JobState
from daemon.dicom.commitment import (
    REQUEST_STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    MalformedCommitment,
    commitment_report,
    read_commitment_request,
)
from daemon.dicom.network import UNCOMPRESSED, AssociationOptions, client_tls_args
from daemon.dicom.status import (
    CLASS_INSTANCE_CONFLICT,
    NO_SUCH_ACTION,
    NO_SUCH_OBJECT_INSTANCE,
    NOT_AUTHORIZED,
    RESOURCE_LIMITATION,
    SUCCESS,
    describe_rejection,
    status_meaning,
)
from daemon.logsetup import kv
from daemon.receive.ingest import DB_UNAVAILABLE

log = logging.getLogger(__name__)

# How long the job waits for the receiver's own first attempt before any worker may try.
FIRST_ATTEMPT_SECONDS = 10.0
# A modality that keeps its association this long after our N-ACTION-RSP (without asking
# to release it) waits for the report there; one that releases sooner gets a new one.
HOLD_SECONDS = 0.2
HOLD_POLL_SECONDS = 0.01
REPORT_THREADS = 4
UIDS_PER_QUERY = 500


class ReportNotDelivered(Exception):
    """The modality did not take the report; the job is retried with the retry policy."""

    retryable = True


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the report says: instances kept, and (class, instance, reason) of the others."""

    committed: tuple[Reference, ...]
    failed: tuple[Failure, ...]


def _durable(path: str, size: int) -> bool:
    """The instance's file is where its row says, with the size its row says."""
    try:
        return os.stat(path).st_size == size
    except OSError:
        return False


def decide(conn: Connection, requested: Sequence[Reference]) -> Outcome:
    """Which requested instances we keep: a current row of the same SOP class whose file is
    in the spool. A row whose file is gone fails as "no such object instance" (logged)."""
    uids = [uid for _, uid in requested]
    found: dict[str, Any] = {}
    for start in range(0, len(uids), UIDS_PER_QUERY):
        rows = conn.execute(
            select(
                Instance.sop_instance_uid, Instance.sop_class_uid, Instance.path, Instance.size
            ).where(
                Instance.sop_instance_uid.in_(uids[start : start + UIDS_PER_QUERY]),
                Instance.superseded_at.is_(None),
                Instance.deleted_at.is_(None),
            )
        ).all()
        found.update((r.sop_instance_uid, r) for r in rows)
    committed: list[Reference] = []
    failed: list[Failure] = []
    for sop_class, uid in requested:
        row = found.get(uid)
        if row is None:
            failed.append((sop_class, uid, NO_SUCH_OBJECT_INSTANCE))
        elif row.sop_class_uid != sop_class:
            failed.append((sop_class, uid, CLASS_INSTANCE_CONFLICT))
        elif not _durable(row.path, row.size):
            log.warning("instance file missing from the spool", extra=kv(sop=uid))
            failed.append((sop_class, uid, NO_SUCH_OBJECT_INSTANCE))
        else:
            committed.append((sop_class, uid))
    return Outcome(tuple(committed), tuple(failed))


def _outcome(engine: Engine, request: Any) -> Outcome:
    """The request's outcome: decided now and recorded, or as an earlier attempt recorded it."""
    if request.decided_at is None:
        requested = [(str(c), str(u)) for c, u in request.requested]
        with engine.begin() as conn:
            outcome = decide(conn, requested)
            commitments.save_outcome(conn, request.id, outcome.committed, outcome.failed)
            request = commitments.load(conn, request.id)
    return Outcome(
        tuple((str(c), str(u)) for c, u in request.committed or ()),
        tuple((str(c), str(u), int(r)) for c, u, r in request.failed or ()),
    )


def _held_open(assoc: Association) -> bool:
    """Whether the modality keeps the N-ACTION's association (no release within HOLD_SECONDS).

    Only the association's state is read: pynetdicom's `acse.is_release_requested()` takes
    the request off the association's queue, and the association, never seeing it, would
    leave the modality's release unanswered until the modality's own timeout.
    """
    deadline = time.monotonic() + HOLD_SECONDS
    while time.monotonic() < deadline:
        if not assoc.is_established:
            return False
        time.sleep(HOLD_POLL_SECONDS)
    return bool(assoc.is_established)


def _send(assoc: Association, event_type: int, info: Any) -> int | None:
    """Send the N-EVENT-REPORT; the modality's status, or None when none came back."""
    try:
        answer, _ = assoc.send_n_event_report(
            info, event_type, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
        )
    except (RuntimeError, ValueError):  # association gone, or no commitment context on it
        return None
    return int(answer.Status) if "Status" in answer else None


def _send_new(settings: Settings, source: Source, event_type: int, info: Any) -> int | None:
    """Report on an association of our own to the modality, as the SCP by role selection."""
    ae = AE(ae_title=settings.dicom.ae_title)
    AssociationOptions.from_settings(settings.dicom).apply(ae)
    ae.add_requested_context(StorageCommitmentPushModel, list(UNCOMPRESSED))
    assoc = ae.associate(
        source.host,
        source.port,
        ae_title=source.ae_title,
        ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)],
        tls_args=client_tls_args(source.tls, source.host),
    )
    if not assoc.is_established:
        if assoc.is_rejected:
            rj = assoc.acceptor.primitive
            why = describe_rejection(rj.result, rj.result_source, rj.diagnostic)
        else:
            why = "no association (connection refused, aborted or timed out)"
        raise ReportNotDelivered(
            f"{source.name} ({source.ae_title}@{source.host}:{source.port}): {why}"
        )
    try:
        return _send(assoc, event_type, info)
    finally:
        if assoc.is_established:
            assoc.release()


def deliver(
    engine: Engine,
    settings: Settings,
    job: queue.ClaimedJob,
    owner: str,
    assoc: Association | None = None,
) -> None:
    """Send the request's report (on `assoc` if the modality holds it open) and complete the
    job with the request marked reported; ReportNotDelivered when the modality did not take it."""
    request_id = int(job.payload["request_id"])
    with engine.connect() as conn:
        request = commitments.load(conn, request_id)
    if request is None or request.state == CommitmentState.REPORTED:
        with engine.begin() as conn:
            queue.complete(conn, job.id, owner)
        return
    outcome = _outcome(engine, request)
    event_type, info = commitment_report(request.transaction_uid, outcome.committed, outcome.failed)
    how = "same association"
    answer = _send(assoc, event_type, info) if assoc is not None and _held_open(assoc) else None
    if answer is None:
        source = settings.source_for(request.calling_ae)
        if source is None:
            raise ReportNotDelivered(f"calling AE {request.calling_ae} is in no [[sources]] entry")
        how = f"new association to {source.name}"
        answer = _send_new(settings, source, event_type, info)
    if answer is None:
        raise ReportNotDelivered(f"no answer to the N-EVENT-REPORT on the {how}")
    if answer != SUCCESS:
        raise ReportNotDelivered(
            f"the modality refused the N-EVENT-REPORT: 0x{answer:04X} {status_meaning(answer)}"
        )
    detail = f"{len(outcome.committed)} committed, {len(outcome.failed)} failed, {how}"
    with engine.begin() as conn:
        commitments.mark(conn, request_id, CommitmentState.REPORTED, detail)
        queue.complete(conn, job.id, owner)
    log.info(
        "commitment reported",
        extra=kv(
            calling_ae=request.calling_ae,
            transaction=request.transaction_uid,
            committed=len(outcome.committed),
            failed=len(outcome.failed),
            via=how,
        ),
    )


def run_commitment_report(ctx: WorkerContext, job: queue.ClaimedJob) -> None:
    """The `commitment-report` job as a worker runs it: always on a new association."""
    deliver(ctx.engine, ctx.settings, job, ctx.owner)


def report_failed(
    ctx: WorkerContext, job: queue.ClaimedJob, state: JobState | None, error: str
) -> None:
    """A report job that died leaves its request marked dead (an operator may retry it)."""
    if state == JobState.DEAD:
        _mark_dead(ctx.engine, job, error)


def _mark_dead(engine: Engine, job: queue.ClaimedJob, error: str) -> None:
    with engine.begin() as conn:
        commitments.mark(conn, int(job.payload["request_id"]), CommitmentState.DEAD, error)


def _log_crash(attempt: concurrent.futures.Future[None]) -> None:
    """A first attempt that failed unexpectedly: its lease runs out and a worker retries."""
    exc = attempt.exception()
    if exc is not None:
        log.error("commitment report attempt crashed; its job will be retried", exc_info=exc)


class CommitmentScp:
    """The N-ACTION handler of one receiver process, and its first attempts at reports."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self._settings = settings
        self._engine = engine
        self._owner = f"{socket.gethostname()}:{os.getpid()}:receiver"
        self._policy = queue.RetryPolicy.from_settings(settings.retry)
        self._reporters = concurrent.futures.ThreadPoolExecutor(
            REPORT_THREADS, thread_name_prefix="commitment-report"
        )

    def on_action(self, event: evt.Event) -> tuple[int, None]:
        """EVT_N_ACTION: record the request and its report job, answer; never raises."""
        calling = event.assoc.requestor.ae_title
        if event.action_type != REQUEST_STORAGE_COMMITMENT:
            log.warning(
                "storage commitment action refused",
                extra=kv(calling_ae=calling, action_type=event.action_type, status="0x0123"),
            )
            return NO_SUCH_ACTION, None
        if self._settings.source_for(calling) is None:
            log.warning(
                "storage commitment refused: calling AE is in no [[sources]] entry",
                extra=kv(calling_ae=calling, status=f"0x{NOT_AUTHORIZED:04X}"),
            )
            return NOT_AUTHORIZED, None
        try:
            transaction_uid, references = read_commitment_request(event.action_information)
        except MalformedCommitment as exc:
            log.warning(
                "storage commitment request refused",
                extra=kv(calling_ae=calling, status=f"0x{exc.status:04X}", error=str(exc)),
            )
            return exc.status, None
        try:
            with self._engine.begin() as conn:
                request_id, key, repeated = commitments.record_request(
                    conn,
                    transaction_uid,
                    calling,
                    references,
                    max_attempts=self._settings.retry.max_attempts,
                    first_attempt_seconds=FIRST_ATTEMPT_SECONDS,
                )
        except DB_UNAVAILABLE as exc:
            log.error(
                "storage commitment request not recorded: database unavailable",
                extra=kv(calling_ae=calling, transaction=transaction_uid, error=type(exc).__name__),
            )
            return RESOURCE_LIMITATION, None
        log.info(
            "storage commitment requested",
            extra=kv(
                calling_ae=calling,
                transaction=transaction_uid,
                instances=len(references),
                request=request_id,
                repeated=repeated,
            ),
        )
        attempt = self._reporters.submit(self._first_attempt, event.assoc, key)
        attempt.add_done_callback(_log_crash)
        return SUCCESS, None

    def _first_attempt(self, assoc: Association, key: str) -> None:
        """Report as soon as the N-ACTION-RSP is out (pynetdicom sends it before it lets this
        thread use the association); a failure goes to the queue for the workers."""
        dicom = self._settings.dicom
        # No heartbeat here: the lease outlasts the longest attempt (the same association,
        # then a new one), so no worker can take the job while this thread still tries.
        lease = self._settings.workers.lease_seconds + 2 * (
            dicom.acse_timeout + dicom.dimse_timeout
        )
        try:
            job = queue.claim_key(self._engine, key, self._owner, lease)
            if job is None:
                return
            try:
                deliver(self._engine, self._settings, job, self._owner, assoc)
            except (ReportNotDelivered, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                state = queue.fail(self._engine, job.id, self._owner, error, self._policy)
                log.warning(
                    "commitment report not delivered; will retry",
                    extra=kv(job=job.id, now=state or "lost", error=error[:300]),
                )
                if state == JobState.DEAD:
                    _mark_dead(self._engine, job, error)
        except DB_UNAVAILABLE as exc:
            log.error(
                "commitment report postponed: database unavailable",
                extra=kv(job_key=key, error=type(exc).__name__),
            )

    def close(self) -> None:
        """Let running first attempts finish (each is bounded by the association timeouts)."""
        self._reporters.shutdown(wait=True)
