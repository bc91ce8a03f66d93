"""Reports by STOW-RS: to pacs-ai's own DICOMweb server, and to a peer whose answers we set."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage, EnhancedSRStorage, generate_uid
from sqlalchemy import Engine, select, update

from daemon.config import DicomWebDestination, Settings
from daemon.db import queue
from daemon.db.keys import DISPATCH, VERIFY
from daemon.db.queue import ClaimedJob
from daemon.db.schema import Dispatch, Job, utcnow
from daemon.dispatch import dicomweb
from daemon.dispatch.destinations import address, echo, send
from daemon.dispatch.job import DispatchFailed, run_dispatch
from daemon.dispatch.scu import (
    CONNECT_FAILED,
    SENT,
    SENT_WITH_WARNING,
    STORE_FAILED,
)
from tests.peers import RecordingStow, free_port
from tests.pki import make_pki
from tests.unit.dispatch.dicomfiles import add_dispatch
from tests.unit.http.conftest import Face, StartFace, start_face  # noqa: F401 (fixture)


def web(url: str, **fields: Any) -> DicomWebDestination:
    return DicomWebDestination(kind="dicomweb", name="archive", url=url, **fields)


def failed(reason: int, uid: str) -> dict[str, Any]:
    item = {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [reason]}}
    return {"00081198": {"vr": "SQ", "Value": [item]}}


def stored(uid: str, warning: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [uid]}}
    if warning is not None:
        item["00081196"] = {"vr": "US", "Value": [warning]}
    return {"00081199": {"vr": "SQ", "Value": [item]}}


def uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# Against pacs-ai's own STOW-RS server ------------------------------------------------------


def test_a_report_is_stored_by_stow_rs_with_the_bearer_token(
    start_face: StartFace,  # noqa: F811
    sr_pair: tuple[Path, Path],
) -> None:
    face = start_face()
    dest = web(face.dicomweb, token=face.tokens["store"])
    outcome = send(dest, sr_pair[0], sr_pair[1], "PACSAI")
    assert outcome.ok and outcome.kind == SENT, outcome
    assert (outcome.sop_class_uid, outcome.sop_instance_uid) == (
        Comprehensive3DSRStorage,
        uid_of(sr_pair[0]),
    )
    assert [r.sop_instance_uid for r in face.rows()] == [uid_of(sr_pair[0])]
    assert address(dest) == face.dicomweb


def test_a_refused_token_is_a_retryable_failure_that_names_the_token(
    start_face: StartFace,  # noqa: F811
    sr_pair: tuple[Path, Path],
) -> None:
    face = start_face()
    outcome = send(web(face.dicomweb, token="not-the-token"), sr_pair[0], None, "PACSAI")
    assert not outcome.ok and outcome.retryable
    assert outcome.detail.startswith("HTTP 401") and "token" in outcome.detail
    assert face.rows() == []


def test_https_with_a_client_certificate_authenticates_the_sender(
    start_face: StartFace,  # noqa: F811
    sr_pair: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path / "pki", client_subject="/CN=ai-node")
    tls = {"certificate": pki / "server.crt", "key": pki / "server.key", "ca": pki / "ca.crt"}
    face = start_face(tls={**tls, "client_role": "store"})
    client_tls = {
        "certificate": pki / "client.crt",
        "key": pki / "client.key",
        "ca": pki / "ca.crt",
    }
    outcome = send(web(face.dicomweb, tls=client_tls), sr_pair[0], None, "PACSAI")
    assert outcome.ok, outcome
    assert face.rows()[0].calling_ae == "ai-node"
    # The system CAs do not know our test CA: the server is not trusted, nothing is sent.
    untrusted = send(web(face.dicomweb, token=face.tokens["store"]), sr_pair[0], None, "PACSAI")
    assert not untrusted.ok and untrusted.kind == CONNECT_FAILED and untrusted.retryable


def test_an_archive_that_is_not_there_is_a_retryable_connect_failure(
    sr_pair: tuple[Path, Path],
) -> None:
    dest = web(f"http://127.0.0.1:{free_port()}/dicomweb")
    outcome = send(dest, sr_pair[0], None, "PACSAI")
    assert (outcome.ok, outcome.kind, outcome.retryable) == (False, CONNECT_FAILED, True)
    assert not echo(dest, "PACSAI").ok


# Against a peer whose answers the test sets ------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "retryable"),
    [(0xA700, True), (0xA900, False), (0xC000, False), (0x0110, True)],
)
def test_a_failure_reason_is_judged_as_the_same_c_store_status(
    sr_pair: tuple[Path, Path], reason: int, retryable: bool
) -> None:
    uid = uid_of(sr_pair[0])
    with RecordingStow(lambda _c, _p: (409, failed(reason, uid))) as peer:
        outcome = send(web(peer.url), sr_pair[0], None, "PACSAI")
    assert (outcome.ok, outcome.kind, outcome.retryable) == (False, STORE_FAILED, retryable)
    assert outcome.status == reason
    assert f"0x{reason:04X}" in outcome.detail


def test_a_refused_sop_class_sends_the_enhanced_sr_twin(sr_pair: tuple[Path, Path]) -> None:
    def answer(_ctype: str, parts: list[bytes]) -> tuple[int, dict[str, Any]]:
        sent = dcmread(io.BytesIO(parts[0]))
        if sent.SOPClassUID == Comprehensive3DSRStorage:
            return 409, failed(0x0122, str(sent.SOPInstanceUID))
        return 200, stored(str(sent.SOPInstanceUID))

    with RecordingStow(answer) as peer:
        outcome = send(web(peer.url), sr_pair[0], None, "PACSAI")
    assert outcome.ok and outcome.fallback_used and outcome.sop_class_uid == EnhancedSRStorage
    assert len(peer.requests) == 2
    assert outcome.sop_instance_uid != uid_of(sr_pair[0])


def test_a_warning_is_sent_with_warning(sr_pair: tuple[Path, Path]) -> None:
    uid = uid_of(sr_pair[0])
    with RecordingStow(lambda _c, _p: (202, stored(uid, warning=0xB000))) as peer:
        outcome = send(web(peer.url), sr_pair[0], None, "PACSAI")
    assert outcome.ok and outcome.kind == SENT_WITH_WARNING
    method, path, _query, _auth, parts = peer.requests[0]
    assert (method, path) == ("POST", "/dicomweb/studies")
    assert dcmread(io.BytesIO(parts[0])).SOPInstanceUID == uid


@pytest.mark.parametrize(("status", "retryable"), [(503, True), (413, False), (415, False)])
def test_an_answer_without_our_instance_is_judged_by_its_http_status(
    sr_pair: tuple[Path, Path], status: int, retryable: bool
) -> None:
    with RecordingStow(lambda _c, _p: (status, None)) as peer:
        outcome = send(web(peer.url), sr_pair[0], None, "PACSAI")
    assert (outcome.ok, outcome.retryable) == (False, retryable)
    assert outcome.detail.startswith(f"HTTP {status}")


@pytest.mark.parametrize(
    ("qido", "expected"),
    [
        ((200, "match"), dicomweb.FOUND),
        ((200, []), dicomweb.ABSENT),
        ((204, None), dicomweb.ABSENT),
        ((405, None), dicomweb.UNSUPPORTED),
        ((500, None), dicomweb.QUERY_FAILED),
    ],
)
def test_qido_rs_finds_the_instance_or_says_why_not(qido: tuple[int, Any], expected: str) -> None:
    study, uid = generate_uid(), generate_uid()
    body = [{"00080018": {"vr": "UI", "Value": [uid]}}] if qido[1] == "match" else qido[1]
    with RecordingStow(qido=(qido[0], body)) as peer:
        kind, _detail = dicomweb.find_instance(web(peer.url, token="t0k"), study, uid)
        _method, path, query, auth, _parts = peer.requests[0]
    assert kind == expected
    assert path == f"/dicomweb/studies/{study}/instances"
    assert query == f"SOPInstanceUID={uid}"
    assert auth == "Bearer t0k"


def test_the_dispatch_job_records_a_dicomweb_delivery_like_a_dimse_one(
    engine: Engine, sr_pair: tuple[Path, Path]
) -> None:
    main, fallback = sr_pair
    dest = {"kind": "dicomweb", "name": "archive", "verify": "qido"}
    with RecordingStow(lambda _c, _p: (503, None)) as down:
        dispatch_id = add_dispatch(engine, main, fallback, destination="archive")
        settings = Settings(destinations=[{**dest, "url": down.url}])
        with pytest.raises(DispatchFailed) as err:
            run_dispatch(engine, claim(engine), settings)
    assert err.value.retryable and "HTTP 503" in str(err.value)
    with RecordingStow(lambda _c, _p: (200, stored(uid_of(main)))) as up:
        settings = Settings(destinations=[{**dest, "url": up.url}])
        with engine.begin() as conn:  # the worker would retry the job after its backoff
            conn.execute(update(Job).values(state="queued", run_after=utcnow()))
        run_dispatch(engine, claim(engine), settings)
    with engine.connect() as conn:
        row = conn.execute(select(Dispatch).where(Dispatch.id == dispatch_id)).one()
        verify = conn.execute(select(Job).where(Job.kind == VERIFY)).one()
    assert (row.state, row.sent_sop_class_uid, row.attempts) == (
        "sent", Comprehensive3DSRStorage, 2
    )
    assert verify.payload["sop_instance_uid"] == uid_of(main)


def claim(engine: Engine) -> ClaimedJob:
    job = queue.claim(engine, "test-worker", [DISPATCH], lease_seconds=60)
    assert job is not None
    return job
