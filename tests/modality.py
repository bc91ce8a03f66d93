"""A modality as pynetdicom plays it: stores a study, tells MPPS, asks for Storage Commitment.

No Debian package sends MPPS, so the tests (and the benchmark) use this simulator:

    with ModalitySimulator("CT01") as ct:              # its own SCP, for commitment reports
        with ct.associate(port) as assoc:              # storage, MPPS and commitment contexts
            ct.mpps_create(assoc, step, study_uid)
            ct.store(assoc, datasets)
            ct.mpps_set(assoc, step, "COMPLETED", performed(datasets))
            ct.request_commitment(assoc, transaction, references(datasets), hold=5.0)
        ct.wait_for_report(transaction, timeout=10)

`hold` keeps the association open that long for the report (a modality that waits for
it there); 0 releases at once (Orthanc's way), and the report must then come on an
association the daemon opens to `ct.port`, which the simulator records too, with the
status `report_status` (a modality that refuses the report).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ModalityPerformedProcedureStep,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    StorageCommitmentPushModel,
)

from daemon.dicom.commitment import (
    REQUEST_STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    CommitmentReport,
    commitment_request,
    read_commitment_report,
    reference_items,
)
from tests.peers import LOOPBACK, InProcessPeer

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
STORAGE_CLASSES = (
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)
Series = dict[str, list[tuple[str, str]]]  # series UID -> [(SOP Class UID, SOP Instance UID)]


@dataclasses.dataclass(frozen=True)
class Received:
    """One N-EVENT-REPORT the modality got: what it said and on which association."""

    report: CommitmentReport
    same_association: bool
    at: float


def references(datasets: Sequence[Dataset]) -> list[tuple[str, str]]:
    """(SOP Class UID, SOP Instance UID) of each dataset: what a commitment request names."""
    return [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in datasets]


def performed(datasets: Sequence[Dataset]) -> Series:
    """The Performed Series Sequence of the datasets, by series."""
    out: Series = {}
    for ds in datasets:
        out.setdefault(str(ds.SeriesInstanceUID), []).append(
            (str(ds.SOPClassUID), str(ds.SOPInstanceUID))
        )
    return out


def mpps_create_attributes(study_uid: str, *, status: str = "IN PROGRESS") -> Dataset:
    """An N-CREATE Attribute List with every Type 1 attribute (PS3.4 Table F.7.2-1)."""
    ds = Dataset()
    item = Dataset()
    item.StudyInstanceUID = study_uid
    item.AccessionNumber = ""
    item.RequestedProcedureID = ""
    item.ScheduledProcedureStepID = ""
    item.ScheduledProcedureStepDescription = ""
    item.ScheduledProtocolCodeSequence = []
    ds.ScheduledStepAttributesSequence = [item]
    ds.PatientName = "SIM^PATIENT"
    ds.PatientID = "SIM-0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.ReferencedPatientSequence = []
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "MODALITY"
    ds.PerformedStationName = ""
    ds.PerformedLocation = ""
    ds.PerformedProcedureStepStartDate = "20250101"
    ds.PerformedProcedureStepStartTime = "120000"
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepDescription = ""
    ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = []
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.Modality = "CT"
    ds.StudyID = ""
    ds.PerformedProtocolCodeSequence = []
    ds.PerformedSeriesSequence = []
    return ds


def mpps_set_attributes(
    state: str, series: Series, *, discontinued_reason: str | None = None
) -> Dataset:
    """An N-SET Modification List ending the step (or updating it) with its series."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = state
    ds.PerformedProcedureStepEndDate = "20250101"
    ds.PerformedProcedureStepEndTime = "121500"
    items = []
    for series_uid, instances in series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.PerformingPhysicianName = ""
        item.ProtocolName = "SIM"
        item.OperatorsName = ""
        item.SeriesDescription = ""
        item.RetrieveAETitle = ""
        item.ReferencedNonImageCompositeSOPInstanceSequence = []
        item.ReferencedImageSequence = reference_items(instances)
        items.append(item)
    ds.PerformedSeriesSequence = items
    if discontinued_reason is not None:
        code = Dataset()
        code.CodeValue = "110514"
        code.CodingSchemeDesignator = "DCM"
        code.CodeMeaning = discontinued_reason
        ds.PerformedProcedureStepDiscontinuationReasonCodeSequence = [code]
    return ds


class ModalitySimulator(InProcessPeer):
    """A modality: an SCU for storage, MPPS and commitment, and an SCP for late reports."""

    def __init__(self, aet: str = "MODALITY", *, report_status: int = 0x0000) -> None:
        self.aet = aet
        self.host = LOOPBACK
        self.report_status = report_status
        self.received: list[Received] = []
        self._arrived = threading.Condition(threading.RLock())
        self._scp = AE(ae_title=aet)
        self._scp.add_supported_context(
            StorageCommitmentPushModel, UNCOMPRESSED, scu_role=True, scp_role=True
        )
        self._server: object | None = None
        self.port = 0

    # The SCP side: reports on associations the daemon opens --------------------------------

    def _record(self, event: evt.Event, same: bool) -> int:
        report = read_commitment_report(event.event_type, event.event_information)
        with self._arrived:
            self.received.append(Received(report, same, time.monotonic()))
            self._arrived.notify_all()
        return self.report_status

    def _on_new_association_report(self, event: evt.Event) -> tuple[int, None]:
        return self._record(event, same=False), None

    def start(self, port: int = 0) -> None:
        """Listen for reports (on `port`, or a free one), e.g. again after `stop`."""
        server = self._scp.start_server(
            (LOOPBACK, port),
            block=False,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_new_association_report)],
        )
        self._server = server
        self.port = int(server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # type: ignore[attr-defined]
            self._server = None

    def reports(self, transaction_uid: str) -> list[Received]:
        """Every report received for the transaction so far."""
        with self._arrived:
            return [r for r in self.received if r.report.transaction_uid == transaction_uid]

    def wait_for_report(self, transaction_uid: str, timeout: float) -> Received:
        """The first report for the transaction; AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._arrived:  # reentrant: `reports` takes it again
            while not self.reports(transaction_uid):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no commitment report for {transaction_uid}")
                self._arrived.wait(left)
            return self.reports(transaction_uid)[0]

    # The SCU side ------------------------------------------------------------------------

    @contextmanager
    def associate(
        self, port: int, called: str = "PACSAI", *, storage: bool = True, timeout: float = 30
    ) -> Iterator[Association]:
        """An established association for storage, MPPS and commitment (reports on it are
        recorded); released at the end unless already gone (aborted when the release is not
        answered within `timeout` seconds)."""
        ae = AE(ae_title=self.aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        if storage:
            for sop_class in STORAGE_CLASSES:
                ae.add_requested_context(sop_class, UNCOMPRESSED)
        ae.add_requested_context(ModalityPerformedProcedureStep, UNCOMPRESSED)
        ae.add_requested_context(StorageCommitmentPushModel, UNCOMPRESSED)

        def on_report(event: evt.Event) -> tuple[int, None]:
            return self._record(event, same=True), None

        assoc = ae.associate(
            LOOPBACK,
            port,
            ae_title=called,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
        )
        if not assoc.is_established:
            raise ConnectionError(f"association to port {port} as {self.aet} not accepted")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def store(self, assoc: Association, datasets: Sequence[Dataset]) -> list[int]:
        """C-STORE each dataset; the statuses."""
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]

    def mpps_create(self, assoc: Association, step_uid: str, attributes: Dataset) -> int:
        """N-CREATE the step; the status."""
        answer, _ = assoc.send_n_create(attributes, ModalityPerformedProcedureStep, step_uid)
        return int(answer.Status)

    def mpps_set(self, assoc: Association, step_uid: str, modification: Dataset) -> int:
        """N-SET the step; the status."""
        answer, _ = assoc.send_n_set(modification, ModalityPerformedProcedureStep, step_uid)
        return int(answer.Status)

    def request_commitment(
        self,
        assoc: Association,
        transaction_uid: str,
        refs: Sequence[tuple[str, str]],
        *,
        hold: float = 0.0,
        info: Dataset | None = None,
    ) -> int:
        """N-ACTION asking to commit `refs`; the status. With `hold`, keep the association
        that long (or until the report came on it) before returning."""
        answer, _ = assoc.send_n_action(
            info if info is not None else commitment_request(transaction_uid, refs),
            REQUEST_STORAGE_COMMITMENT,
            StorageCommitmentPushModel,
            STORAGE_COMMITMENT_INSTANCE,
        )
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline and assoc.is_established:
            if self.reports(transaction_uid):
                break
            time.sleep(0.02)
        return int(answer.Status) if "Status" in answer else -1
