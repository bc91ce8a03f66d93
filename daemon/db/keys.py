"""Job kinds and their idempotency keys: one home, so every stage names a job the same way."""

from __future__ import annotations

ANALYSE = "analyse"
REPORT = "report"
DISPATCH = "dispatch"


def analyse_key(study_uid: str, version: int) -> str:
    """A study version is analysed once."""
    return f"{ANALYSE}:{study_uid}:v{version}"


def report_key(study_uid: str, version: int) -> str:
    """A study version is reported once."""
    return f"{REPORT}:{study_uid}:v{version}"


def dispatch_key(dispatch_id: int) -> str:
    """An outbox row is sent by one job."""
    return f"{DISPATCH}:{dispatch_id}"
