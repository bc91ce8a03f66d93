"""Storage Commitment reports a PACS sends on a new association to our AE (PS3.4 J.3.3).

This is our role as the SCU (we asked a PACS to keep our SR); requests modalities send us
(we are the SCP) are daemon.receive.commitment_scp.

After our `verify` job's N-ACTION (daemon.dispatch.verify), most PACS (Orthanc among
them) open an association of their own to our AE and send the N-EVENT-REPORT there. The
receiver binds `handle_commitment_report` for it; the Dispatch row named by the report's
Transaction UID is then confirmed, or put back to `pending` with one more `dispatch` job
(daemon.db.deliveries).

Wiring in the receiver's AE (daemon/receive/scp.py)::

    add_commitment_context(ae)  # daemon.dicom.commitment
    handlers.append(
        (evt.EVT_N_EVENT_REPORT, handle_commitment_report, [engine, settings.retry.max_attempts])
    )
"""

from __future__ import annotations

import logging

from pynetdicom import evt
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from daemon.config import RetrySettings
from daemon.db.deliveries import APPLIED_UNKNOWN, apply_commitment_report
from daemon.dicom.commitment import MalformedCommitment, read_commitment_report
from daemon.dicom.status import PROCESSING_FAILURE, SUCCESS
from daemon.logsetup import kv

log = logging.getLogger(__name__)

# Attempts of the `dispatch` job a failure report queues, when the receiver binds none.
DEFAULT_RESEND_MAX_ATTEMPTS: int = RetrySettings.model_fields["max_attempts"].default


def handle_commitment_report(
    event: evt.Event,
    engine: Engine,
    resend_max_attempts: int = DEFAULT_RESEND_MAX_ATTEMPTS,
) -> tuple[int, None]:
    """EVT_N_EVENT_REPORT: confirm or resend the dispatch the report is about; never raises.

    Returns pynetdicom's (status, event reply) pair: success once the result is
    committed (also for a transaction we no longer wait for: nothing to retry there),
    0x0113/0x0115 for a report that is not a storage commitment result, and processing
    failure when the database is unavailable, so the PACS may send the report again.
    """
    calling = event.assoc.requestor.ae_title
    try:
        report = read_commitment_report(event.event_type, event.event_information)
    except MalformedCommitment as exc:
        log.warning("unreadable commitment report", extra=kv(calling_ae=calling, error=str(exc)))
        return exc.status, None
    try:
        with engine.begin() as conn:
            done, dispatch_id = apply_commitment_report(
                conn, report, resend_max_attempts=resend_max_attempts
            )
    except OperationalError as exc:
        log.error(
            "commitment report not recorded: database unavailable",
            extra=kv(transaction=report.transaction_uid, error=str(exc).splitlines()[0]),
        )
        return PROCESSING_FAILURE, None
    fields = kv(
        calling_ae=calling,
        transaction=report.transaction_uid,
        dispatch=dispatch_id,
        result=done,
        detail=report.describe(),
    )
    if done == APPLIED_UNKNOWN:
        log.warning("commitment report for no waiting dispatch", extra=fields)
    else:
        log.info("commitment report", extra=fields)
    return SUCCESS, None
