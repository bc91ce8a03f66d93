"""send_file against an in-process SCP: which file goes, and how the peer's answer reads."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.uid import (
    Comprehensive3DSRStorage,
    EnhancedSRStorage,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from daemon.config import Destination
from daemon.dicom.network import AssociationOptions
from daemon.dispatch.scu import (
    ABORTED,
    ECHOED,
    NO_CONTEXT,
    NO_RESPONSE,
    REJECTED,
    SENT,
    SENT_WITH_WARNING,
    STORE_FAILED,
    echo,
    send_file,
)
from tests.peers import RecordingSCP
from tests.unit.dispatch.dicomfiles import write_instance

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def to(scp: RecordingSCP) -> Destination:
    return Destination(name="scp", ae_title=scp.aet, host=scp.host, port=scp.port)


def test_comprehensive_sr_goes_when_accepted(sr_pair: tuple[Path, Path]) -> None:
    with RecordingSCP([Comprehensive3DSRStorage, EnhancedSRStorage]) as scp:
        outcome = send_file(sr_pair[0], sr_pair[1], to(scp), "PACSAI")
    assert outcome.ok and outcome.kind == SENT
    assert outcome.sop_class_uid == Comprehensive3DSRStorage
    assert not outcome.fallback_used
    assert [r[0] for r in scp.received] == [Comprehensive3DSRStorage]
    assert scp.received[0][2] == "PACSAI"


def test_enhanced_sr_goes_when_only_it_is_accepted(sr_pair: tuple[Path, Path]) -> None:
    with RecordingSCP([EnhancedSRStorage]) as scp:
        outcome = send_file(sr_pair[0], sr_pair[1], to(scp), "PACSAI")
    assert outcome.ok
    assert outcome.fallback_used
    assert outcome.sop_class_uid == EnhancedSRStorage
    assert scp.received == [(EnhancedSRStorage, outcome.sop_instance_uid, "PACSAI")]


def test_neither_class_accepted_is_a_retryable_failure(sr_pair: tuple[Path, Path]) -> None:
    with RecordingSCP([SECONDARY_CAPTURE]) as scp:
        outcome = send_file(sr_pair[0], sr_pair[1], to(scp), "PACSAI")
    assert not outcome.ok
    assert outcome.kind == NO_CONTEXT
    assert outcome.retryable
    assert "Comprehensive 3D SR" in outcome.detail and "Enhanced SR" in outcome.detail
    assert scp.received == []


def test_without_fallback_file_the_enhanced_twin_goes_under_its_own_uid(
    sr_pair: tuple[Path, Path],
) -> None:
    main_uid = dcmread(sr_pair[0], stop_before_pixels=True).SOPInstanceUID
    with RecordingSCP([EnhancedSRStorage]) as scp:
        first = send_file(sr_pair[0], None, to(scp), "PACSAI")
        again = send_file(sr_pair[0], None, to(scp), "PACSAI")
    assert first.ok and first.fallback_used
    assert [r[0] for r in scp.received] == [EnhancedSRStorage, EnhancedSRStorage]
    twin_uids = {r[1] for r in scp.received}
    assert len(twin_uids) == 1, "the twin's UID is derived, so a resend is the same instance"
    assert main_uid not in twin_uids
    assert first.sop_instance_uid == again.sop_instance_uid == twin_uids.pop()


def test_class_refused_at_store_time_falls_back(sr_pair: tuple[Path, Path]) -> None:
    # A peer that negotiates both classes but answers 0x0122 to each C-STORE: the
    # fallback is tried on the same association and its answer is the outcome.
    with RecordingSCP([Comprehensive3DSRStorage, EnhancedSRStorage], status=0x0122) as scp:
        outcome = send_file(sr_pair[0], sr_pair[1], to(scp), "PACSAI")
    assert [r[0] for r in scp.received] == [Comprehensive3DSRStorage, EnhancedSRStorage]
    assert outcome.fallback_used
    assert outcome.detail == "0x0122 SOP class not supported"


def test_out_of_resources_is_reported_with_meaning(sr_pair: tuple[Path, Path]) -> None:
    with RecordingSCP([Comprehensive3DSRStorage], status=0xA700) as scp:
        outcome = send_file(sr_pair[0], sr_pair[1], to(scp), "PACSAI")
    assert not outcome.ok
    assert outcome.kind == STORE_FAILED
    assert outcome.status == 0xA700
    assert outcome.detail == "0xA700 out of resources"
    assert outcome.retryable


def test_warning_status_is_success(sr_pair: tuple[Path, Path]) -> None:
    with RecordingSCP([Comprehensive3DSRStorage], status=0xB007) as scp:
        outcome = send_file(sr_pair[0], sr_pair[1], to(scp), "PACSAI")
    assert outcome.ok
    assert outcome.kind == SENT_WITH_WARNING


def test_unknown_calling_ae_rejection_names_the_cause_and_is_retried(
    sr_pair: tuple[Path, Path],
) -> None:
    with RecordingSCP([Comprehensive3DSRStorage], calling_aets=["SOMEONE"]) as scp:
        outcome = send_file(sr_pair[0], sr_pair[1], to(scp), "PACSAI")
    assert outcome.kind == REJECTED
    assert "calling AE title not recognized" in outcome.detail
    assert outcome.retryable


def test_sop_class_comes_from_the_file(tmp_path: Path) -> None:
    # Heatmaps are Secondary Capture: no fallback, sent as what the file says it is.
    sc = tmp_path / "heatmap.dcm"
    uid = write_instance(sc, SECONDARY_CAPTURE, transfer_syntax=ImplicitVRLittleEndian)
    with RecordingSCP([SECONDARY_CAPTURE]) as scp:
        outcome = send_file(sc, None, to(scp), "PACSAI")
    assert outcome.ok
    assert scp.received == [(SECONDARY_CAPTURE, uid, "PACSAI")]


def test_echo_reports_round_trip() -> None:
    with RecordingSCP([]) as scp:
        outcome = echo(to(scp), "PACSAI")
    assert outcome.ok and outcome.kind == ECHOED
    assert outcome.round_trip_ms is not None and outcome.round_trip_ms >= 0


def test_slow_peer_hits_the_dimse_timeout_and_is_retried(sr_pair: tuple[Path, Path]) -> None:
    with RecordingSCP([Comprehensive3DSRStorage], delay_s=1.5) as scp:
        outcome = send_file(
            sr_pair[0], sr_pair[1], to(scp), "PACSAI", AssociationOptions(dimse_timeout=0.3)
        )
    assert not outcome.ok
    assert outcome.kind in (ABORTED, NO_RESPONSE)
    assert outcome.detail.startswith("C-STORE ")
    assert outcome.retryable


def test_compressed_file_is_not_sent_through_an_uncompressed_context(tmp_path: Path) -> None:
    sc = tmp_path / "heatmap-jpeg.dcm"
    write_instance(sc, SECONDARY_CAPTURE, transfer_syntax=JPEGBaseline8Bit)
    with RecordingSCP([SECONDARY_CAPTURE]) as scp:
        outcome = send_file(sc, None, to(scp), "PACSAI")
    assert outcome.kind == NO_CONTEXT
    assert "JPEG Baseline" in outcome.detail
    assert scp.received == []
