"""The receiver's DICOM conformance, read from the presentation contexts it really offers.

`pacs-ai conformance` prints it; a test holds the README's table to it, so the documented
SOP classes and transfer syntaxes are the ones a sender gets.
"""

from __future__ import annotations

from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.presentation import PresentationContext

from daemon.receive.scp import add_receiver_contexts

VERIFICATION = "1.2.840.10008.1.1"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
MPPS = "1.2.840.10008.3.1.2.3.3"
NOT_STORAGE = (VERIFICATION, STORAGE_COMMITMENT, MPPS)


def receiver_contexts() -> list[PresentationContext]:
    """The contexts the receiver's AE supports, exactly as the receiver adds them."""
    ae = AE()
    add_receiver_contexts(ae)
    return list(ae.supported_contexts)


def _syntaxes(context: PresentationContext) -> tuple[str, ...]:
    return tuple(str(ts) for ts in context.transfer_syntax)


def storage_classes(contexts: list[PresentationContext]) -> list[PresentationContext]:
    """The storage contexts (everything but Verification, Storage Commitment and MPPS)."""
    return [cx for cx in contexts if cx.abstract_syntax not in NOT_STORAGE]


def conformance_markdown(*, sop_classes: bool = False) -> str:
    """The services, and the transfer syntaxes each accepts, as Markdown tables."""
    contexts = receiver_contexts()
    by_uid = {str(cx.abstract_syntax): cx for cx in contexts}
    storage = storage_classes(contexts)
    storage_syntaxes = {_syntaxes(cx) for cx in storage}
    if len(storage_syntaxes) != 1:
        raise RuntimeError("storage SOP classes differ in their transfer syntaxes")
    (syntaxes,) = storage_syntaxes
    commitment = _syntaxes(by_uid[STORAGE_COMMITMENT])
    mpps = _syntaxes(by_uid[MPPS])
    lines = [
        "| service | SOP classes | our role |",
        "| --- | --- | --- |",
        f"| Verification | {VERIFICATION} | SCP |",
        f"| Storage | the {len(storage)} storage SOP classes pynetdicom names (`pacs-ai "
        "conformance --sop-classes` lists them), and any other storage SOP class, private "
        "ones included; stored as sent | SCP |",
        f"| Storage Commitment Push Model | {STORAGE_COMMITMENT} | SCP for modalities "
        "(`[[sources]]`: N-ACTION answered, N-EVENT-REPORT on their association or a new one "
        "to them) and SCU towards destinations (`verify = \"commitment\"`: N-ACTION, the "
        "report taken on the same or a new association) |",
        f"| Modality Performed Procedure Step | {MPPS} | SCP (N-CREATE, N-SET) |",
        "",
        "| transfer syntax | UID | Verification, Storage | Storage Commitment | MPPS |",
        "| --- | --- | --- | --- | --- |",
    ]
    for uid in dict.fromkeys((*syntaxes, *commitment, *mpps)):
        marks = ["yes" if uid in group else "" for group in (syntaxes, commitment, mpps)]
        lines.append(f"| {UID(uid).name} | {uid} | {' | '.join(marks)} |")
    if sop_classes:
        lines += ["", "| storage SOP class | UID |", "| --- | --- |"]
        lines += [f"| {UID(cx.abstract_syntax).name} | {cx.abstract_syntax} |" for cx in storage]
    return "\n".join(lines) + "\n"
