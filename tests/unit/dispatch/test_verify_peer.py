"""The verify SCU against an in-process PACS: storage commitment reports on the same
association (what Orthanc does not do), C-FIND matches, and peers that refuse the service.

`CommitmentPeer` is the peer: a pynetdicom AE that keeps a set of SOP Instance UIDs,
answers N-ACTION and, `inline_report=True`, sends the N-EVENT-REPORT on the N-ACTION's
association; it answers C-FIND at IMAGE level from the same set.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from daemon.config import Destination
from daemon.dicom.commitment import (
    STORAGE_COMMITMENT_INSTANCE,
    commitment_report,
    read_commitment_request,
)
from daemon.dicom.network import UNCOMPRESSED
from daemon.dicom.status import NO_SUCH_OBJECT_INSTANCE, OUT_OF_RESOURCES, PENDING, SUCCESS
from daemon.dispatch.verify import (
    AWAITING,
    CONFIRMED,
    NOT_FOUND,
    QUERY_FAILED,
    REFUSED,
    UNREACHABLE,
    UNSUPPORTED,
    SentInstance,
    find_instance,
    request_commitment,
)
from tests.peers import InProcessPeer, free_port

OUR_AE = "PACSAI"
SYNTAXES = list(UNCOMPRESSED)


class CommitmentPeer(InProcessPeer):
    """An in-process PACS for storage commitment and C-FIND; see the module docstring."""

    def __init__(
        self,
        kept: set[str],
        *,
        inline_report: bool = True,
        commitment: bool = True,
        find: bool = True,
        action_status: int = SUCCESS,
        find_status: int = SUCCESS,
    ) -> None:
        self.kept = kept
        self.inline_report = inline_report
        self.action_status = action_status
        self.find_status = find_status
        self.actions: list[Dataset] = []
        self.queries: list[Dataset] = []
        self.report_statuses: list[int] = []
        self.aet = "FAKEPACS"
        self.host = "127.0.0.1"
        self._ae = AE(ae_title=self.aet)
        self._ae.add_supported_context(Verification)
        if commitment:
            self._ae.add_supported_context(
                StorageCommitmentPushModel, SYNTAXES, scu_role=True, scp_role=True
            )
        if find:
            self._ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind, SYNTAXES)
        self._server: Any = None
        self.port = 0

    def destination(self, verify: str = "commitment") -> Destination:
        return Destination(
            name="fake", ae_title=self.aet, host=self.host, port=self.port, verify=verify
        )

    def _on_action(self, event: evt.Event) -> tuple[int, None]:
        request = event.action_information
        self.actions.append(request)
        if self.action_status == SUCCESS and self.inline_report:
            # After our response went out: the report follows on the same association.
            threading.Timer(0.05, self._report, args=(event.assoc, request)).start()
        return self.action_status, None

    def _report(self, assoc: Any, request: Dataset) -> None:
        transaction_uid, references = read_commitment_request(request)
        good = [ref for ref in references if ref[1] in self.kept]
        bad = [(*ref, NO_SUCH_OBJECT_INSTANCE) for ref in references if ref[1] not in self.kept]
        event_type, info = commitment_report(transaction_uid, good, bad)
        status, _ = assoc.send_n_event_report(
            info, event_type, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
        )
        self.report_statuses.append(int(status.Status) if "Status" in status else -1)

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        self.queries.append(query)
        if self.find_status != SUCCESS:
            yield self.find_status, None
            return
        if query.SOPInstanceUID in self.kept:
            match = Dataset()
            match.QueryRetrieveLevel = "IMAGE"
            match.StudyInstanceUID = query.StudyInstanceUID
            match.SeriesInstanceUID = generate_uid()
            match.SOPInstanceUID = query.SOPInstanceUID
            yield PENDING, match

    def start(self) -> None:
        self._server = self._ae.start_server(
            (self.host, 0),
            block=False,
            evt_handlers=[(evt.EVT_N_ACTION, self._on_action), (evt.EVT_C_FIND, self._on_find)],
        )
        self.port = int(self._server.server_address[1])

    def stop(self) -> None:
        self._server.shutdown()


def sent_instance() -> SentInstance:
    return SentInstance(generate_uid(), Comprehensive3DSRStorage, generate_uid())


def test_commitment_report_on_the_same_association_confirms() -> None:
    instance = sent_instance()
    transaction = generate_uid()
    with CommitmentPeer({instance.sop_instance_uid}) as pacs:
        outcome = request_commitment(pacs.destination(), OUR_AE, transaction, instance)
    assert outcome.kind == CONFIRMED, outcome.detail
    assert outcome.report is not None
    assert outcome.report.transaction_uid == transaction
    assert outcome.report.committed == (instance.sop_instance_uid,)
    assert pacs.report_statuses == [SUCCESS]
    (action,) = pacs.actions
    assert action.TransactionUID == transaction
    (ref,) = action.ReferencedSOPSequence
    assert ref.ReferencedSOPClassUID == Comprehensive3DSRStorage
    assert ref.ReferencedSOPInstanceUID == instance.sop_instance_uid


def test_commitment_failure_on_the_same_association_is_refused() -> None:
    instance = sent_instance()
    with CommitmentPeer(set()) as pacs:
        outcome = request_commitment(pacs.destination(), OUR_AE, generate_uid(), instance)
    assert outcome.kind == REFUSED
    assert outcome.report is not None and not outcome.report.success
    assert outcome.report.failed == ((instance.sop_instance_uid, NO_SUCH_OBJECT_INSTANCE),)
    assert "0x0112 no such object instance" in outcome.detail


def test_no_report_within_the_wait_is_awaiting() -> None:
    with CommitmentPeer(set(), inline_report=False) as pacs:
        outcome = request_commitment(
            pacs.destination(), OUR_AE, generate_uid(), sent_instance(), wait_seconds=0.2
        )
    assert outcome.kind == AWAITING
    assert len(pacs.actions) == 1


def test_refused_n_action_is_a_query_failure() -> None:
    with CommitmentPeer(set(), action_status=0x0110) as pacs:
        outcome = request_commitment(pacs.destination(), OUR_AE, generate_uid(), sent_instance())
    assert outcome.kind == QUERY_FAILED
    assert "0x0110" in outcome.detail


def test_peer_without_storage_commitment_is_unsupported() -> None:
    with CommitmentPeer(set(), commitment=False) as pacs:
        outcome = request_commitment(pacs.destination(), OUR_AE, generate_uid(), sent_instance())
    assert outcome.kind == UNSUPPORTED


def test_closed_port_is_unreachable() -> None:
    dest = Destination(
        name="closed", ae_title="X", host="127.0.0.1", port=free_port(), verify="find"
    )
    assert find_instance(dest, OUR_AE, sent_instance()).kind == UNREACHABLE
    assert request_commitment(dest, OUR_AE, generate_uid(), sent_instance()).kind == UNREACHABLE


def test_find_confirms_a_stored_instance_by_study_and_sop_instance_uid() -> None:
    instance = sent_instance()
    with CommitmentPeer({instance.sop_instance_uid}) as pacs:
        outcome = find_instance(pacs.destination("find"), OUR_AE, instance)
    assert outcome.kind == CONFIRMED, outcome.detail
    (query,) = pacs.queries
    assert query.QueryRetrieveLevel == "IMAGE"
    assert query.StudyInstanceUID == instance.study_uid
    assert query.SOPInstanceUID == instance.sop_instance_uid


def test_find_without_a_match_is_not_found() -> None:
    with CommitmentPeer(set()) as pacs:
        assert find_instance(pacs.destination("find"), OUR_AE, sent_instance()).kind == NOT_FOUND


def test_find_failure_status_is_a_query_failure() -> None:
    with CommitmentPeer(set(), find_status=OUT_OF_RESOURCES) as pacs:
        outcome = find_instance(pacs.destination("find"), OUR_AE, sent_instance())
    assert outcome.kind == QUERY_FAILED
    assert "0xA700" in outcome.detail


def test_peer_without_find_is_unsupported() -> None:
    with CommitmentPeer(set(), find=False) as pacs:
        assert find_instance(pacs.destination("find"), OUR_AE, sent_instance()).kind == UNSUPPORTED
