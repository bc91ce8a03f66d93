"""Job kinds and their idempotency keys: one home, so every stage names a job the same way."""

from __future__ import annotations

EMBED = "embed"
ANALYSE = "analyse"
REPORT = "report"
DISPATCH = "dispatch"
VERIFY = "verify"
COMMITMENT_REPORT = "commitment-report"


def embed_key(study_uid: str, version: int, instances: int, *, arriving: bool = False) -> str:
    """An early run covers what had arrived: once per count of instances, and apart for a
    pass while the study arrives (CNNs only), so the whole run after a pause still comes."""
    return f"{EMBED}:{study_uid}:v{version}:n{instances}" + (":arriving" if arriving else "")


def analyse_key(study_uid: str, version: int) -> str:
    """A study version is analysed once."""
    return f"{ANALYSE}:{study_uid}:v{version}"


def report_key(study_uid: str, version: int) -> str:
    """A study version is reported once."""
    return f"{REPORT}:{study_uid}:v{version}"


def dispatch_key(dispatch_id: int) -> str:
    """An outbox row is sent by one job."""
    return f"{DISPATCH}:{dispatch_id}"


def verify_key(dispatch_id: int, send_attempt: int) -> str:
    """Each successful send of an outbox row (numbered by its attempt) is verified once."""
    return f"{VERIFY}:{dispatch_id}:a{send_attempt}"


def resend_key(dispatch_id: int, send_attempt: int) -> str:
    """A send the destination did not confirm is repeated by one more `dispatch` job."""
    return f"{DISPATCH}:{dispatch_id}:resend-a{send_attempt}"


def commitment_report_key(request_id: int, invocation: int) -> str:
    """A modality's Storage Commitment request (each N-ACTION naming it) is answered once."""
    return f"{COMMITMENT_REPORT}:{request_id}:n{invocation}"
