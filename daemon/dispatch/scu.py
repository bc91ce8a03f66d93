"""C-STORE and C-ECHO towards one destination, with every outcome turned into a value.

Nothing here raises for a network or peer problem: the caller gets a `SendOutcome` or
`EchoOutcome` that says what happened in one line and whether trying again may help.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, Comprehensive3DSRStorage, EnhancedSRStorage
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification

from daemon.config import Destination
from daemon.dicom.network import UNCOMPRESSED, AssociationOptions, client_tls_args
from daemon.dicom.status import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    INVALID_SOP_INSTANCE,
    MISTYPED_ARGUMENT,
    REJECTED_PERMANENT,
    REJECTED_TRANSIENT,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
    describe_rejection,
    is_warning,
    status_meaning,
)
from daemon.logsetup import kv
from daemon.uids import hashed_uid

log = logging.getLogger(__name__)

# Failures the same bytes will meet again: resending cannot help, the report is dead.
PERMANENT_FAILURES = frozenset({INVALID_SOP_INSTANCE, MISTYPED_ARGUMENT})
# A store of the main file that failed with one of these tries the fallback file, if accepted.
FALLBACK_TRIGGERS = frozenset({SOP_CLASS_NOT_SUPPORTED})

# Outcome kinds: what happened, named.
SENT = "sent"
SENT_WITH_WARNING = "sent-with-warning"
STORE_FAILED = "store-failed"
NO_RESPONSE = "no-response"
CONNECT_FAILED = "connect-failed"
REJECTED = "rejected"
ABORTED = "aborted"
NO_CONTEXT = "no-accepted-context"
BAD_FILE = "bad-file"
ECHOED = "echoed"
ECHO_FAILED = "echo-failed"


@dataclasses.dataclass(frozen=True)
class SendOutcome:
    """What one C-STORE attempt came to.

    Attributes
    ----------
    ok: the destination took the instance (success or a warning status).
    kind: one of the named kinds (SENT, SENT_WITH_WARNING, STORE_FAILED, REJECTED, ...).
    detail: one line for logs and the dispatch row, e.g. ``0xA700 out of resources``.
    retryable: whether another attempt later may succeed (the retry budget decides).
    status: the DIMSE status when the peer answered a C-STORE, else None.
    sop_class_uid, sop_instance_uid: what was sent (the fallback's when it was used).
    fallback_used: the Enhanced SR (fallback) file went instead of the main one.
    """

    ok: bool
    kind: str
    detail: str
    retryable: bool
    status: int | None = None
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    fallback_used: bool = False

    def __str__(self) -> str:
        """One line for the CLI and logs: `sent (Enhanced SR Storage, fallback): 0x0000 success`."""
        what = UID(self.sop_class_uid).name if self.sop_class_uid else ""
        if what and self.fallback_used:
            what += ", fallback"
        return f"{self.kind} ({what}): {self.detail}" if what else f"{self.kind}: {self.detail}"


@dataclasses.dataclass(frozen=True)
class EchoOutcome:
    """What one C-ECHO came to; `round_trip_ms` times the C-ECHO itself (not the association)."""

    ok: bool
    kind: str
    detail: str
    status: int | None = None
    round_trip_ms: float | None = None

    def __str__(self) -> str:
        """One line for `pacs-ai echo` and the start-up check: `echoed: 0x0000 success in 1 ms`."""
        timing = f" in {self.round_trip_ms:.1f} ms" if self.round_trip_ms is not None else ""
        return f"{self.kind}: {self.detail}{timing}"


@dataclasses.dataclass(frozen=True)
class _Candidate:
    """A file we may send and the header facts that decide how."""

    path: Path
    sop_class_uid: UID
    sop_instance_uid: UID
    transfer_syntax: UID
    relabelled: bool = False  # sent as `sop_class_uid`/`sop_instance_uid`, not as on disk


def enhanced_twin(main: _Candidate) -> _Candidate:
    """The Enhanced SR twin of a Comprehensive 3D SR without 3D coordinates, under its own UID.

    Its content needs no change (no SCOORD3D is ever written), so the twin is made at send
    time and only for a destination that refuses Comprehensive 3D SR.
    """
    return _Candidate(
        main.path,
        EnhancedSRStorage,
        UID(hashed_uid(["pacs-ai/enhanced-twin/v1", main.sop_instance_uid])),
        main.transfer_syntax,
        relabelled=True,
    )


def enhanced_twin_dataset(path: Path) -> Dataset:
    """The Enhanced SR twin of the Comprehensive 3D SR at `path`, exactly as it is sent."""
    twin = _dataset_to_send(enhanced_twin(_read_candidate(path)))
    assert isinstance(twin, Dataset)
    return twin


def _dataset_to_send(cand: _Candidate) -> Path | Dataset:
    if not cand.relabelled:
        return cand.path
    ds = dcmread(cand.path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = cand.sop_class_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = cand.sop_instance_uid
    return ds


def classify_store_status(status: int) -> tuple[str, bool]:
    """(kind, retryable) for a C-STORE response status: success and warnings count as sent."""
    if status == SUCCESS:
        return SENT, False
    if is_warning(status):
        return SENT_WITH_WARNING, False
    if status in PERMANENT_FAILURES:
        return STORE_FAILED, False
    if status & 0xFF00 == DATASET_DOES_NOT_MATCH_SOP_CLASS or status & 0xF000 == CANNOT_UNDERSTAND:
        return STORE_FAILED, False
    # Out of resources, processing failure, not authorized, SOP class not supported, and
    # anything unknown: the peer or its configuration may change, the retry budget decides.
    return STORE_FAILED, True


def store_outcome(
    status: int, candidate_sop_class: str, instance: str, fallback: bool
) -> SendOutcome:
    """The outcome for a C-STORE response `status`."""
    kind, retryable = classify_store_status(status)
    ok = kind in (SENT, SENT_WITH_WARNING)
    return SendOutcome(
        ok=ok,
        kind=kind,
        detail=f"0x{status:04X} {status_meaning(status)}",
        retryable=retryable,
        status=status,
        sop_class_uid=candidate_sop_class,
        sop_instance_uid=instance,
        fallback_used=fallback,
    )


class AssociationWatcher:
    """Records what the association layer saw, since pynetdicom only logs the details."""

    def __init__(self) -> None:
        self.connected = False
        self.last_acse: Any = None

    def handlers(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_CONN_OPEN, self._on_open), (evt.EVT_ACSE_RECV, self._on_acse)]

    def _on_open(self, event: evt.Event) -> None:
        self.connected = True

    def _on_acse(self, event: evt.Event) -> None:
        self.last_acse = event.primitive

    def failure(self, destination: Destination, assoc: Association) -> tuple[str, str]:
        """(kind, detail) for an association that did not get established."""
        where = f"{destination.ae_title}@{destination.host}:{destination.port}"
        primitive = self.last_acse
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in (
            REJECTED_PERMANENT,
            REJECTED_TRANSIENT,
        ):
            text = describe_rejection(
                primitive.result, primitive.result_source, primitive.diagnostic
            )
            return REJECTED, f"{text} ({where})"
        if isinstance(primitive, A_ASSOCIATE) and primitive.result == 0x00:
            return NO_CONTEXT, f"no presentation context accepted by {where}"
        if isinstance(primitive, (A_ABORT, A_P_ABORT)):
            return ABORTED, f"association aborted by {where}"
        if not self.connected:
            return CONNECT_FAILED, f"could not connect to {where}"
        if assoc.is_aborted:
            return ABORTED, f"association aborted with {where} (no answer to the request)"
        return ABORTED, f"association with {where} not established"


def _read_candidate(path: Path) -> _Candidate:
    """Header facts of a file to send; raises OSError or InvalidDicomError when unusable."""
    ds = dcmread(path, stop_before_pixels=True)
    meta = getattr(ds, "file_meta", None)
    tsyntax = getattr(meta, "TransferSyntaxUID", None)
    if tsyntax is None or "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        raise InvalidDicomError(f"{path}: no transfer syntax, SOP Class or SOP Instance UID")
    return _Candidate(path, UID(ds.SOPClassUID), UID(ds.SOPInstanceUID), UID(tsyntax))


def _contexts(candidates: Sequence[_Candidate]) -> list[PresentationContext]:
    """Each file's SOP class with its own transfer syntax plus the two uncompressed ones."""
    contexts: list[PresentationContext] = []
    seen: set[str] = set()
    for cand in candidates:
        if cand.sop_class_uid in seen:
            continue
        seen.add(cand.sop_class_uid)
        if cand.transfer_syntax in UNCOMPRESSED:
            syntaxes = [
                cand.transfer_syntax,
                *(ts for ts in UNCOMPRESSED if ts != cand.transfer_syntax),
            ]
            contexts.append(build_context(cand.sop_class_uid, syntaxes))
        else:
            # A compressed file can only go as it is: give its syntax a context of its own
            # so the peer cannot settle for an uncompressed one when it also takes this.
            contexts.append(build_context(cand.sop_class_uid, [cand.transfer_syntax]))
            contexts.append(build_context(cand.sop_class_uid, list(UNCOMPRESSED)))
    return contexts


def _sendable(assoc: Association, cand: _Candidate) -> bool:
    """Whether an accepted context can carry this file (same or convertible syntax)."""
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax != cand.sop_class_uid:
            continue
        accepted = UID(cx.transfer_syntax[0])
        if accepted == cand.transfer_syntax:
            return True
        if accepted in UNCOMPRESSED and cand.transfer_syntax in UNCOMPRESSED:
            return True
    return False


def make_ae(calling_ae: str, options: AssociationOptions) -> AE:
    """Our SCU's AE with the configured timeouts and PDU size (send, echo and verify share it)."""
    return options.apply(AE(ae_title=calling_ae))


def _associate(
    ae: AE,
    destination: Destination,
    contexts: list[PresentationContext],
    watcher: AssociationWatcher,
) -> Association | str:
    """The association, or a one-line reason it could not even be attempted (TLS setup)."""
    try:
        tls_args = client_tls_args(destination.tls, destination.host)
    except (OSError, ssl.SSLError) as exc:
        return f"TLS setup failed for {destination.name}: {exc}"
    return ae.associate(
        destination.host,
        destination.port,
        contexts=contexts,
        ae_title=destination.ae_title,
        max_pdu=ae.maximum_pdu_size,
        evt_handlers=watcher.handlers(),
        tls_args=tls_args,
    )


def _store(assoc: Association, cand: _Candidate, fallback: bool) -> SendOutcome:
    """One C-STORE on an established association."""
    try:
        rsp: Dataset = assoc.send_c_store(_dataset_to_send(cand))
    except (OSError, InvalidDicomError, AttributeError, ValueError) as exc:
        # ValueError: no usable context or the data set cannot be encoded; the others:
        # the file changed or broke after its header was read.
        return SendOutcome(
            ok=False,
            kind=BAD_FILE,
            detail=f"cannot send {cand.path.name}: {exc}",
            retryable=False,
            sop_class_uid=cand.sop_class_uid,
            sop_instance_uid=cand.sop_instance_uid,
            fallback_used=fallback,
        )
    if "Status" not in rsp:
        kind, how = (ABORTED, "aborted") if assoc.is_aborted else (NO_RESPONSE, "no response")
        return SendOutcome(
            ok=False,
            kind=kind,
            detail=f"C-STORE {how} (DIMSE timeout or connection lost)",
            retryable=True,
            sop_class_uid=cand.sop_class_uid,
            sop_instance_uid=cand.sop_instance_uid,
            fallback_used=fallback,
        )
    return store_outcome(int(rsp.Status), cand.sop_class_uid, cand.sop_instance_uid, fallback)


def send_file(
    path: Path,
    fallback_path: Path | None,
    destination: Destination,
    calling_ae: str,
    options: AssociationOptions | None = None,
) -> SendOutcome:
    """C-STORE `path` to `destination`; send the fallback instead if only its class is taken.

    Both SOP classes are proposed on one association, each with the file's own transfer
    syntax and explicit/implicit little endian. The main file goes when its class is
    accepted; the fallback goes when only its class is accepted, or when the main store is
    refused as "SOP class not supported". The fallback is `fallback_path`, or for a
    Comprehensive 3D SR without one its Enhanced SR twin (`enhanced_twin`). Never raises
    for peer problems.
    """
    options = options or AssociationOptions()
    try:
        main = _read_candidate(path)
        alternate = _read_candidate(fallback_path) if fallback_path is not None else None
    except (OSError, InvalidDicomError) as exc:
        return SendOutcome(False, BAD_FILE, f"cannot read report file: {exc}", retryable=False)
    if alternate is None and main.sop_class_uid == Comprehensive3DSRStorage:
        alternate = enhanced_twin(main)
    candidates = [main] if alternate is None else [main, alternate]

    watcher = AssociationWatcher()
    assoc = _associate(make_ae(calling_ae, options), destination, _contexts(candidates), watcher)
    if isinstance(assoc, str):
        return SendOutcome(False, CONNECT_FAILED, assoc, retryable=True)
    if not assoc.is_established:
        kind, detail = watcher.failure(destination, assoc)
        if kind == NO_CONTEXT:
            classes = " or ".join(c.sop_class_uid.name for c in candidates)
            detail = f"{detail} for {classes}"
        return SendOutcome(False, kind, detail, retryable=True)

    try:
        outcome = _send_on(assoc, main, alternate, destination)
    finally:
        if assoc.is_established:
            assoc.release()
    _log_outcome(outcome, destination)
    return outcome


def _send_on(
    assoc: Association, main: _Candidate, alternate: _Candidate | None, destination: Destination
) -> SendOutcome:
    """Pick the file the peer accepted and send it; try the fallback after a class refusal."""
    alternate_ok = alternate is not None and _sendable(assoc, alternate)
    if _sendable(assoc, main):
        outcome = _store(assoc, main, fallback=False)
        if outcome.ok or outcome.status not in FALLBACK_TRIGGERS or not alternate_ok:
            return outcome
        log.warning(
            "main report refused, sending fallback",
            extra=kv(destination=destination.name, status=outcome.detail),
        )
    if alternate is not None and alternate_ok:
        return _store(assoc, alternate, fallback=True)
    classes = " or ".join(
        f"{c.sop_class_uid.name} ({c.transfer_syntax.name})" for c in (main, alternate) if c
    )
    return SendOutcome(
        False,
        NO_CONTEXT,
        f"{destination.ae_title} accepted no presentation context for {classes}",
        retryable=True,
    )


def _log_outcome(outcome: SendOutcome, destination: Destination) -> None:
    """Warn of a warning status; the caller logs every send, naming what it sent."""
    if outcome.kind == SENT_WITH_WARNING:
        log.warning(
            "sent with warning status",
            extra=kv(
                destination=destination.name,
                status=outcome.detail,
                sop_instance=outcome.sop_instance_uid,
                fallback=outcome.fallback_used,
            ),
        )


def echo(
    destination: Destination, calling_ae: str, options: AssociationOptions | None = None
) -> EchoOutcome:
    """C-ECHO `destination`: is it reachable and does it accept us (CLI `echo`, start-up check)."""
    options = options or AssociationOptions()
    watcher = AssociationWatcher()
    contexts = [build_context(Verification)]
    assoc = _associate(make_ae(calling_ae, options), destination, contexts, watcher)
    if isinstance(assoc, str):
        return EchoOutcome(False, CONNECT_FAILED, assoc)
    if not assoc.is_established:
        kind, detail = watcher.failure(destination, assoc)
        return EchoOutcome(False, kind, detail)
    try:
        started = time.perf_counter()
        rsp = assoc.send_c_echo()
        elapsed_ms = (time.perf_counter() - started) * 1000.0
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in rsp:
        return EchoOutcome(False, NO_RESPONSE, "C-ECHO got no response")
    status = int(rsp.Status)
    if status != SUCCESS:
        return EchoOutcome(False, ECHO_FAILED, f"C-ECHO status 0x{status:04X}", status)
    return EchoOutcome(True, ECHOED, f"0x{status:04X} success", status, round(elapsed_ms, 2))
