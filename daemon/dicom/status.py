"""DIMSE statuses and A-ASSOCIATE-RJ codes by name, with the standard's words for each.

One home for the numbers both directions speak: the receiver answers with them, the
dispatcher and verifier read them from peers. Codes pynetdicom names (`Status`) are taken
from it; the rest are named here after PS3.4 B.2.3, PS3.7 C and PS3.8 9.3.4.
"""

from __future__ import annotations

from pynetdicom.status import Status

SUCCESS = int(Status.SUCCESS)
PENDING = int(Status.PENDING)  # C-FIND: matches are continuing, one carried (PS3.4 C.4.1.1.4)
PENDING_WARNING = 0xFF01  # C-FIND: matches continuing, optional keys not supported
FIND_PENDING = (PENDING, PENDING_WARNING)

# General failures (PS3.7 C.4).
NO_SUCH_ATTRIBUTE = 0x0105
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
# STOW-RS: an instance of another study than the URL names (Orthanc answers the same).
STUDY_MISMATCH = PROCESSING_FAILURE
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_OBJECT_INSTANCE = 0x0112
NO_SUCH_EVENT_TYPE = 0x0113
INVALID_ARGUMENT_VALUE = 0x0115
INVALID_SOP_INSTANCE = 0x0117
CLASS_INSTANCE_CONFLICT = 0x0119
MISSING_ATTRIBUTE = 0x0120
MISSING_ATTRIBUTE_VALUE = 0x0121
SOP_CLASS_NOT_SUPPORTED = 0x0122
NO_SUCH_ACTION = 0x0123
NOT_AUTHORIZED = 0x0124
DUPLICATE_INVOCATION = 0x0210
UNRECOGNIZED_OPERATION = 0x0211
MISTYPED_ARGUMENT = 0x0212
RESOURCE_LIMITATION = 0x0213
DUPLICATE_TRANSACTION_UID = 0x0131

# Storage service class (PS3.4 B.2.3); ranges are matched by their high bits.
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
WARNING_COERCION_OF_DATA_ELEMENTS = 0xB000
WARNING_ELEMENTS_DISCARDED = 0xB006
WARNING_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xB007
# Our receiver's "cannot understand" codes, one per reason so a sender's log says why.
CANNOT_PARSE_DATASET = 0xC001
MISSING_UID = 0xC002
INVALID_UID = 0xC003
SOP_INSTANCE_MISMATCH = 0xC004
SERIES_IN_OTHER_STUDY = 0xC005

WARNING_MEANINGS = {
    WARNING_COERCION_OF_DATA_ELEMENTS: "coercion of data elements",
    WARNING_ELEMENTS_DISCARDED: "elements discarded",
    WARNING_DATASET_DOES_NOT_MATCH_SOP_CLASS: "data set does not match SOP class",
}
FAILURE_MEANINGS = {
    NO_SUCH_ATTRIBUTE: "no such attribute",
    INVALID_ATTRIBUTE_VALUE: "invalid attribute value",
    PROCESSING_FAILURE: "processing failure",
    DUPLICATE_SOP_INSTANCE: "duplicate SOP instance",
    NO_SUCH_OBJECT_INSTANCE: "no such object instance",
    NO_SUCH_EVENT_TYPE: "no such event type",
    INVALID_ARGUMENT_VALUE: "invalid argument value",
    INVALID_SOP_INSTANCE: "invalid SOP instance",
    CLASS_INSTANCE_CONFLICT: "class / instance conflict",
    MISSING_ATTRIBUTE: "missing attribute",
    MISSING_ATTRIBUTE_VALUE: "missing attribute value",
    SOP_CLASS_NOT_SUPPORTED: "SOP class not supported",
    NO_SUCH_ACTION: "no such action",
    NOT_AUTHORIZED: "not authorized",
    DUPLICATE_INVOCATION: "duplicate invocation",
    UNRECOGNIZED_OPERATION: "unrecognized operation",
    MISTYPED_ARGUMENT: "mistyped argument",
    RESOURCE_LIMITATION: "resource limitation",
    DUPLICATE_TRANSACTION_UID: "duplicate transaction UID",
}


class Refusal(ValueError):
    """A request we answer with the failure `status` (each service names its own kinds)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def is_warning(status: int) -> bool:
    """A 0xBxxx status: the peer did the operation and said something about it."""
    return status & 0xF000 == 0xB000


def status_meaning(status: int) -> str:
    """The standard's name for a status, for a log line a PACS administrator can act on."""
    if status == SUCCESS:
        return "success"
    if status in WARNING_MEANINGS:
        return WARNING_MEANINGS[status]
    if status in FAILURE_MEANINGS:
        return FAILURE_MEANINGS[status]
    if status & 0xFF00 == OUT_OF_RESOURCES:
        return "out of resources"
    if status & 0xFF00 == DATASET_DOES_NOT_MATCH_SOP_CLASS:
        return "data set does not match SOP class"
    if status & 0xF000 == CANNOT_UNDERSTAND:
        return "cannot understand"
    if is_warning(status):
        return "warning"
    return "unknown status"


# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, then (source, reason).
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02
SOURCE_USER = 0x01
SOURCE_ACSE = 0x02
SOURCE_PRESENTATION = 0x03
REJECT_SOURCES = {
    SOURCE_USER: "service user",
    SOURCE_ACSE: "service provider (ACSE)",
    SOURCE_PRESENTATION: "service provider (presentation)",
}
REJECT_REASONS = {
    (SOURCE_USER, 1): "no reason given",
    (SOURCE_USER, 2): "application context name not supported",
    (SOURCE_USER, 3): "calling AE title not recognized",
    (SOURCE_USER, 7): "called AE title not recognized",
    (SOURCE_ACSE, 1): "no reason given",
    (SOURCE_ACSE, 2): "protocol version not supported",
    (SOURCE_PRESENTATION, 1): "temporary congestion",
    (SOURCE_PRESENTATION, 2): "local limit exceeded",
}
# The (result, source, reason) triples pynetdicom's ACSE answers our receiver's refusals with.
REJECT_CALLING_AE = (REJECTED_PERMANENT, SOURCE_USER, 3)
REJECT_CALLED_AE = (REJECTED_PERMANENT, SOURCE_USER, 7)
REJECT_LOCAL_LIMIT = (REJECTED_TRANSIENT, SOURCE_PRESENTATION, 2)


def rejection_reason(source: int | None, reason: int | None) -> str:
    """The standard's words for an A-ASSOCIATE-RJ's (source, reason)."""
    return REJECT_REASONS.get((source or 0, reason or 0), f"reason {reason}")


def describe_rejection(result: int | None, source: int | None, reason: int | None) -> str:
    """One line for an A-ASSOCIATE-RJ that names the cause an admin must fix."""
    kind = "transient" if result == REJECTED_TRANSIENT else "permanent"
    who = REJECT_SOURCES.get(source or 0, f"source {source}")
    return f"association rejected ({kind}) by the {who}: {rejection_reason(source, reason)}"
