"""The `verify` job: prove a destination keeps the report it took, or send the report again.

Per destination (``verify`` in ``[[destinations]]``):

- ``none``: a C-STORE the peer took is final (`sent`); no verify job is queued.
- ``commitment``: a Storage Commitment Push Model N-ACTION asks the destination to commit
  the instance under the row's `transaction_uid`. The N-EVENT-REPORT with the answer may
  come on the same association (handled here) or on a new association the PACS opens to
  our AE (handled by daemon.receive.commitment). Event type 1 confirms the row; event
  type 2 puts it back to `pending` with one more `dispatch` job (daemon.db.deliveries).
- ``find``: a Study Root C-FIND at IMAGE level for the report's Study and SOP Instance
  UIDs; a match confirms the row.
- ``qido`` (DICOMweb destinations): QIDO-RS at instance level for the same UIDs
  (daemon.dispatch.dicomweb); a match confirms the row.

A verify attempt that does not confirm (no report yet, not found, peer unreachable)
raises `VerifyPending`; the worker retries it with the retry policy's backoff. After
`TRIES_PER_SEND` unconfirmed attempts the report is sent again (same SOP Instance UID,
so the PACS keeps one copy) and that send gets a verify job of its own. After
`SENDS_BEFORE_GIVING_UP` sends that were never confirmed, the job dies and the row stays
`sent`: `pacs-ai status` counts it as unconfirmed and lists the dead job.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
import threading
import time
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy import Connection, Engine, select, update

from daemon.config import ConfigError, Destination, DicomWebDestination, Settings
from daemon.db import queue
from daemon.db.deliveries import (
    VERIFY_COMMITMENT,
    VERIFY_FIND,
    VERIFY_NONE,
    VERIFY_QIDO,
    apply_commitment_report,
    mark_confirmed,
    resend,
)
from daemon.db.keys import VERIFY, verify_key
from daemon.db.queue import ClaimedJob
from daemon.db.schema import Dispatch, DispatchState, Report, Study, utcnow
from daemon.dicom.commitment import (
    REQUEST_STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    CommitmentReport,
    MalformedCommitment,
    commitment_request,
    read_commitment_report,
)
from daemon.dicom.network import UNCOMPRESSED, AssociationOptions, client_tls_args
from daemon.dicom.status import FIND_PENDING, SUCCESS, status_meaning
from daemon.dispatch import dicomweb
from daemon.dispatch.scu import NO_CONTEXT, AssociationWatcher, make_ae
from daemon.logsetup import kv

log = logging.getLogger(__name__)

JOB_KIND = VERIFY  # its key: daemon.db.keys.verify_key(dispatch_id, send_attempt)

# Unconfirmed verify attempts of one send before the report is sent again.
TRIES_PER_SEND = 3
# Sends never confirmed before the verify job gives up (the row stays `sent`).
SENDS_BEFORE_GIVING_UP = 3
# How long the N-ACTION association stays open for a report sent on it.
REPORT_WAIT_SECONDS = 2.0
REPORT_POLL_SECONDS = 0.05

# Outcome kinds of one verify attempt.
CONFIRMED = "confirmed"  # committed (event type 1) or found by C-FIND
REFUSED = "commitment-failed"  # event type 2: the destination does not keep the instance
AWAITING = "awaiting-report"  # N-ACTION taken, the report will come on another association
NOT_FOUND = "not-found"  # C-FIND completed without a match
QUERY_FAILED = "query-failed"  # N-ACTION or C-FIND answered with a failure, or no answer
UNREACHABLE = "unreachable"  # no association
UNSUPPORTED = "unsupported"  # the destination refuses the verify service: a configuration error

PAYLOAD_FIELDS = ("dispatch_id", "send_attempt", "sop_class_uid", "sop_instance_uid")
# A QIDO-RS look-up's finding as a verify outcome kind.
QIDO_KINDS = {
    dicomweb.FOUND: CONFIRMED,
    dicomweb.ABSENT: NOT_FOUND,
    dicomweb.QUERY_FAILED: QUERY_FAILED,
    dicomweb.UNREACHABLE: UNREACHABLE,
    dicomweb.UNSUPPORTED: UNSUPPORTED,
}


class VerifyPending(Exception):
    """Not confirmed yet: the worker retries with backoff (the attempt is counted)."""

    retryable = True


class VerifyFailed(Exception):
    """Verification cannot go on; `retryable` False makes the job dead at once."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclasses.dataclass(frozen=True)
class SentInstance:
    """The instance one send delivered: what the destination is asked about."""

    study_uid: str
    sop_class_uid: str
    sop_instance_uid: str


@dataclasses.dataclass(frozen=True)
class VerifyOutcome:
    """What one verify attempt came to; `report` when a commitment report came with it."""

    kind: str
    detail: str
    report: CommitmentReport | None = None


@dataclasses.dataclass(frozen=True)
class _Payload:
    """A verify job's payload: which send of which row, and what that send delivered."""

    dispatch_id: int
    send_attempt: int
    sop_class_uid: str
    sop_instance_uid: str


def enqueue_verify(
    conn: Connection,
    dispatch_id: int,
    send_attempt: int,
    destination: Destination | DicomWebDestination,
    sop_class_uid: str,
    sop_instance_uid: str,
) -> int | None:
    """Queue the verify job of one send in the send's transaction; None when `verify` is none."""
    if destination.verify == VERIFY_NONE:
        return None
    return queue.enqueue(
        conn,
        JOB_KIND,
        verify_key(dispatch_id, send_attempt),
        max_attempts=TRIES_PER_SEND,
        payload={
            "dispatch_id": dispatch_id,
            "destination": destination.name,
            "send_attempt": send_attempt,
            "sop_class_uid": sop_class_uid,
            "sop_instance_uid": sop_instance_uid,
        },
    )


def new_transaction_uid(destination: Destination | DicomWebDestination) -> str | None:
    """A fresh Transaction UID for each send to a commitment destination, else None."""
    return generate_uid(prefix=None) if destination.verify == VERIFY_COMMITMENT else None


def _payload(job: ClaimedJob) -> _Payload:
    """The job's payload, or a permanent failure naming what is missing."""
    try:
        return _Payload(
            dispatch_id=int(job.payload["dispatch_id"]),
            send_attempt=int(job.payload["send_attempt"]),
            sop_class_uid=str(job.payload["sop_class_uid"]),
            sop_instance_uid=str(job.payload["sop_instance_uid"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise VerifyFailed(
            f"job {job.id}: payload needs {', '.join(PAYLOAD_FIELDS)}", retryable=False
        ) from exc


class _ReportCollector:
    """Keeps the commitment report a peer sends on the N-ACTION's own association."""

    def __init__(self, transaction_uid: str) -> None:
        self._transaction_uid = transaction_uid
        self._arrived = threading.Event()
        self.report: CommitmentReport | None = None

    def on_report(self, event: evt.Event) -> tuple[int, None]:
        """EVT_N_EVENT_REPORT handler: record our transaction's report, acknowledge any."""
        try:
            report = read_commitment_report(event.event_type, event.event_information)
        except MalformedCommitment as exc:
            log.warning("unreadable commitment report", extra=kv(error=str(exc)))
            return exc.status, None
        if report.transaction_uid == self._transaction_uid:
            self.report = report
            self._arrived.set()
        return SUCCESS, None

    def wait(self, assoc: Association, seconds: float) -> CommitmentReport | None:
        """The report, once it came, within `seconds` and while the association lasts."""
        deadline = time.monotonic() + seconds
        while not self._arrived.is_set() and assoc.is_established:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.wait(min(REPORT_POLL_SECONDS, remaining))
        return self.report


def _open(
    destination: Destination,
    calling_ae: str,
    options: AssociationOptions,
    abstract_syntax: str,
    ext_neg: list[Any],
    handlers: list[tuple[Any, Any]],
) -> Association | VerifyOutcome:
    """An association proposing one service, or the outcome saying why there is none."""
    ae: AE = make_ae(calling_ae, options)
    ae.add_requested_context(abstract_syntax, list(UNCOMPRESSED))
    watcher = AssociationWatcher()
    try:
        tls_args = client_tls_args(destination.tls, destination.host)
    except (OSError, ssl.SSLError) as exc:
        return VerifyOutcome(UNREACHABLE, f"TLS setup failed for {destination.name}: {exc}")
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        max_pdu=ae.maximum_pdu_size,
        ext_neg=ext_neg,
        evt_handlers=[*watcher.handlers(), *handlers],
        tls_args=tls_args,
    )
    if not assoc.is_established:
        kind, detail = watcher.failure(destination, assoc)
        return VerifyOutcome(UNSUPPORTED if kind == NO_CONTEXT else UNREACHABLE, detail)
    if not any(cx.abstract_syntax == abstract_syntax for cx in assoc.accepted_contexts):
        assoc.release()
        return VerifyOutcome(
            UNSUPPORTED, f"{destination.ae_title} does not accept {abstract_syntax}"
        )
    return assoc


def request_commitment(
    destination: Destination,
    calling_ae: str,
    transaction_uid: str,
    instance: SentInstance,
    *,
    options: AssociationOptions | None = None,
    wait_seconds: float = REPORT_WAIT_SECONDS,
) -> VerifyOutcome:
    """Send the Storage Commitment N-ACTION; wait `wait_seconds` for a report on the association.

    The context is proposed with both roles (SCU for the N-ACTION, SCP for an
    N-EVENT-REPORT on the same association). Never raises for peer problems.
    """
    collector = _ReportCollector(transaction_uid)
    opened = _open(
        destination,
        calling_ae,
        options or AssociationOptions(),
        StorageCommitmentPushModel,
        [build_role(StorageCommitmentPushModel, scu_role=True, scp_role=True)],
        [(evt.EVT_N_EVENT_REPORT, collector.on_report)],
    )
    if isinstance(opened, VerifyOutcome):
        return opened
    assoc = opened
    try:
        status, _ = assoc.send_n_action(
            commitment_request(
                transaction_uid, [(instance.sop_class_uid, instance.sop_instance_uid)]
            ),
            REQUEST_STORAGE_COMMITMENT,
            StorageCommitmentPushModel,
            STORAGE_COMMITMENT_INSTANCE,
        )
        if "Status" not in status:
            return VerifyOutcome(QUERY_FAILED, "N-ACTION got no response")
        code = int(status.Status)
        if code != SUCCESS:
            return VerifyOutcome(QUERY_FAILED, f"N-ACTION refused: 0x{code:04X}")
        report = collector.wait(assoc, wait_seconds)
    finally:
        if assoc.is_established:
            assoc.release()
    if report is None:
        return VerifyOutcome(AWAITING, f"commitment requested (transaction {transaction_uid})")
    return VerifyOutcome(CONFIRMED if report.success else REFUSED, report.describe(), report)


def find_instance(
    destination: Destination,
    calling_ae: str,
    instance: SentInstance,
    *,
    options: AssociationOptions | None = None,
) -> VerifyOutcome:
    """C-FIND (Study Root, IMAGE level) for the instance; CONFIRMED when the PACS lists it."""
    opened = _open(
        destination,
        calling_ae,
        options or AssociationOptions(),
        StudyRootQueryRetrieveInformationModelFind,
        [],
        [],
    )
    if isinstance(opened, VerifyOutcome):
        return opened
    assoc = opened
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = instance.study_uid
    query.SeriesInstanceUID = ""
    query.SOPInstanceUID = instance.sop_instance_uid
    found = False
    final: int | None = None
    try:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            if "Status" not in status:
                break
            code = int(status.Status)
            if code in FIND_PENDING:
                uid = identifier.get("SOPInstanceUID") if identifier is not None else None
                found = found or uid == instance.sop_instance_uid
            else:
                final = code
    finally:
        if assoc.is_established:
            assoc.release()
    if final is None:
        return VerifyOutcome(QUERY_FAILED, "C-FIND got no final response")
    if final != SUCCESS:
        return VerifyOutcome(QUERY_FAILED, f"C-FIND failed: 0x{final:04X} {status_meaning(final)}")
    if found:
        return VerifyOutcome(CONFIRMED, f"found by C-FIND on {destination.name}")
    return VerifyOutcome(NOT_FOUND, f"{instance.sop_instance_uid} not found on {destination.name}")


def run_verify(
    engine: Engine,
    job: ClaimedJob,
    settings: Settings,
    *,
    report_wait_seconds: float = REPORT_WAIT_SECONDS,
) -> None:
    """Verify one send of a report; confirm the row, retry later, or send the report again.

    Raises
    ------
    VerifyPending
        Not confirmed yet; the attempt is counted in the row's `verify_attempts`.
    VerifyFailed
        Nothing to verify against (row, destination or payload gone), the destination
        refuses the verify service, or no send was confirmed (not retryable).
    daemon.db.queue.LeaseLost
        The job was taken from us meanwhile; nothing was recorded.
    """
    payload = _payload(job)
    with engine.connect() as conn:
        row = conn.execute(
            select(
                Dispatch.state,
                Dispatch.attempts,
                Dispatch.destination,
                Dispatch.transaction_uid,
                Study.study_uid,
            )
            .join(Report, Report.id == Dispatch.report_id)
            .join(Study, Study.id == Report.study_id)
            .where(Dispatch.id == payload.dispatch_id)
        ).one_or_none()
    if row is None:
        raise VerifyFailed(f"dispatch {payload.dispatch_id} does not exist", retryable=False)
    if row.state != DispatchState.SENT or row.attempts != payload.send_attempt:
        # Confirmed by a report on another association, or a newer send took over.
        log.info("nothing to verify", extra=kv(dispatch=payload.dispatch_id, state=row.state))
        _complete(engine, job)
        return
    try:
        destination = settings.destination(row.destination)
    except ConfigError as exc:
        raise VerifyFailed(str(exc), retryable=False) from exc
    instance = SentInstance(row.study_uid, payload.sop_class_uid, payload.sop_instance_uid)
    options = AssociationOptions.from_settings(settings.dicom)
    calling_ae = settings.dicom.ae_title
    if isinstance(destination, DicomWebDestination) and destination.verify == VERIFY_QIDO:
        kind, detail = dicomweb.find_instance(
            destination, instance.study_uid, instance.sop_instance_uid, options
        )
        outcome = VerifyOutcome(QIDO_KINDS[kind], detail)
    elif isinstance(destination, DicomWebDestination):
        outcome = None
    elif destination.verify == VERIFY_COMMITMENT:
        if not row.transaction_uid:
            raise VerifyFailed(
                f"dispatch {payload.dispatch_id} has no transaction UID", retryable=False
            )
        outcome = request_commitment(
            destination,
            calling_ae,
            row.transaction_uid,
            instance,
            options=options,
            wait_seconds=report_wait_seconds,
        )
    elif destination.verify == VERIFY_FIND:
        outcome = find_instance(destination, calling_ae, instance, options=options)
    else:
        outcome = None
    if outcome is None:
        log.info("verify is off", extra=kv(dispatch=payload.dispatch_id, to=destination.name))
        _complete(engine, job)
        return
    log.info(
        "verify attempt",
        extra=kv(
            dispatch=payload.dispatch_id,
            destination=destination.name,
            kind=outcome.kind,
            detail=outcome.detail,
            attempt=job.attempts,
        ),
    )
    if outcome.kind == UNSUPPORTED:
        others = "'none'" if isinstance(destination, DicomWebDestination) else "'find' or 'none'"
        raise VerifyFailed(
            f"{destination.name}: {outcome.detail}; set verify = {others}",
            retryable=False,
        )
    settle(engine, job, payload.dispatch_id, payload.send_attempt, outcome, settings)


# What `settle` decided.
SETTLED = "settled"
RETRY = "retry"
RESENT = "resent"
GIVE_UP = "give-up"


def settle(
    engine: Engine,
    job: ClaimedJob,
    dispatch_id: int,
    send_attempt: int,
    outcome: VerifyOutcome,
    settings: Settings,
) -> str:
    """Record one verify attempt's outcome and the job's end in one transaction.

    Returns SETTLED (confirmed, resent after a failure report, or settled elsewhere) or
    RESENT (the last unconfirmed try sent the report again); raises VerifyPending (try
    again later) or VerifyFailed (gave up) after the commit.
    """
    max_attempts = settings.retry.max_attempts
    with engine.begin() as conn:
        decision = _decide(conn, job, dispatch_id, send_attempt, outcome, max_attempts)
        if decision in (SETTLED, RESENT):
            queue.complete(conn, job.id, job.lease_owner)
    if decision == RETRY:
        raise VerifyPending(outcome.detail)
    if decision == GIVE_UP:
        raise VerifyFailed(
            f"not confirmed after {SENDS_BEFORE_GIVING_UP} sends: {outcome.detail}",
            retryable=False,
        )
    if decision == RESENT:
        log.warning(
            "not confirmed, sending again",
            extra=kv(dispatch=dispatch_id, send=send_attempt, detail=outcome.detail),
        )
    return decision


def _decide(
    conn: Connection,
    job: ClaimedJob,
    dispatch_id: int,
    send_attempt: int,
    outcome: VerifyOutcome,
    max_attempts: int,
) -> str:
    """The row changes for one outcome, inside the caller's transaction; returns the decision."""
    if outcome.report is not None:
        apply_commitment_report(conn, outcome.report, resend_max_attempts=max_attempts)
        return SETTLED
    if outcome.kind == CONFIRMED:
        mark_confirmed(conn, dispatch_id, send_attempt, outcome.detail)
        return SETTLED
    now = utcnow()
    counted = conn.execute(
        update(Dispatch)
        .where(
            Dispatch.id == dispatch_id,
            Dispatch.state == DispatchState.SENT,
            Dispatch.attempts == send_attempt,
        )
        .values(verify_attempts=Dispatch.verify_attempts + 1, updated_at=now)
        .returning(Dispatch.verify_attempts)
    ).one_or_none()
    if counted is None:
        return SETTLED  # confirmed or resent meanwhile (a report on another association)
    if job.attempts < job.max_attempts:
        return RETRY
    if counted.verify_attempts >= TRIES_PER_SEND * SENDS_BEFORE_GIVING_UP:
        return GIVE_UP
    reason = f"not confirmed after {job.attempts} verify attempts: {outcome.detail}"
    resend(conn, dispatch_id, send_attempt, reason, max_attempts=max_attempts)
    return RESENT


def _complete(engine: Engine, job: ClaimedJob) -> None:
    """Finish a job that had nothing (left) to verify."""
    with engine.begin() as conn:
        queue.complete(conn, job.id, job.lease_owner)
