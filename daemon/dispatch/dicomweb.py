"""STOW-RS, QIDO-RS and a reachability probe towards one DICOMweb destination (httpx).

The outcomes are the DIMSE path's values (`SendOutcome`, `EchoOutcome`) so the dispatch
job records, retries and audits both kinds alike. A STOW-RS response names each
instance's fate in DICOM JSON (PS3.18 Annex I); its Failure Reason is a C-STORE status
and is judged as one (`classify_store_status`): 0xA7xx retried, 0xA9xx and 0xCxxx final,
0x0122 (SOP class not supported) sends the Enhanced SR fallback, as over DIMSE. Nothing
here raises for a network or peer problem.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import secrets
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread, dcmwrite
from pydicom.errors import InvalidDicomError
from pydicom.uid import Comprehensive3DSRStorage

from daemon.config import DicomWebDestination
from daemon.dicom.network import AssociationOptions
from daemon.dicom.status import status_meaning
from daemon.dispatch.scu import (
    BAD_FILE,
    CONNECT_FAILED,
    ECHO_FAILED,
    ECHOED,
    FALLBACK_TRIGGERS,
    NO_RESPONSE,
    SENT,
    SENT_WITH_WARNING,
    STORE_FAILED,
    EchoOutcome,
    SendOutcome,
    classify_store_status,
    enhanced_twin_dataset,
)
from daemon.logsetup import kv

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
SOP_INSTANCE_UID = "00080018"
REFERENCED_SOP_INSTANCE = "00081155"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
# HTTP statuses another attempt may cure: configuration (token, URL) or a busy server.
RETRYABLE_HTTP = frozenset({401, 403, 404, 405, 408, 429})

# What a QIDO-RS look-up found.
FOUND = "found"
ABSENT = "absent"
QUERY_FAILED = "query-failed"
UNREACHABLE = "unreachable"
UNSUPPORTED = "unsupported"


def address(destination: DicomWebDestination) -> str:
    """Where the destination is, for lines and `status`."""
    return destination.url


def _client(destination: DicomWebDestination, options: AssociationOptions) -> httpx.Client:
    """A client with the destination's token, client certificate and CA (OSError if unreadable)."""
    tls = destination.tls
    context = ssl.create_default_context(cafile=str(tls.ca) if tls and tls.ca else None)
    if tls is not None and tls.certificate is not None and tls.key is not None:
        context.load_cert_chain(str(tls.certificate), str(tls.key))
    headers = {"Accept": DICOM_JSON}
    if destination.token is not None:
        headers["Authorization"] = f"Bearer {destination.token.get_secret_value()}"
    timeout = httpx.Timeout(options.dimse_timeout, connect=options.connect_timeout)
    return httpx.Client(verify=context, headers=headers, timeout=timeout)


def _http_failure(exc: httpx.HTTPError, url: str) -> tuple[str, str]:
    """(kind, detail) for a request that got no HTTP answer."""
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return NO_RESPONSE, f"no answer from {url} in time ({type(exc).__name__})"
    return CONNECT_FAILED, f"could not reach {url}: {type(exc).__name__}: {exc}"


def multipart_body(parts: list[bytes]) -> tuple[bytes, str]:
    """A multipart/related body of application/dicom parts and its Content-Type."""
    boundary = secrets.token_hex(16)
    chunks = []
    for part in parts:
        chunks += [
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
            part,
            b"\r\n",
        ]
    chunks.append(f"--{boundary}--\r\n".encode())
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return b"".join(chunks), content_type


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _item_for(body: Any, sequence: str, sop_instance_uid: str) -> dict[str, Any] | None:
    """The response item of `sequence` that names our instance, if any."""
    if not isinstance(body, dict):
        return None
    for item in (body.get(sequence) or {}).get("Value", []) or []:
        value = (item.get(REFERENCED_SOP_INSTANCE) or {}).get("Value") or [None]
        if value[0] == sop_instance_uid:
            return dict(item)
    return None


def _first_value(item: dict[str, Any], tag: str) -> int | None:
    value = (item.get(tag) or {}).get("Value") or [None]
    return int(value[0]) if isinstance(value[0], int) else None


def stow_outcome(
    response: httpx.Response, sop_class_uid: str, sop_instance_uid: str
) -> SendOutcome:
    """What a STOW-RS response says about our one instance."""
    code = response.status_code
    body = _json(response)
    failed = _item_for(body, FAILED_SOP_SEQUENCE, sop_instance_uid)
    stored = _item_for(body, REFERENCED_SOP_SEQUENCE, sop_instance_uid)
    what = {"sop_class_uid": sop_class_uid, "sop_instance_uid": sop_instance_uid}
    if failed is not None:
        reason = _first_value(failed, FAILURE_REASON)
        if reason is not None:
            kind, retryable = classify_store_status(reason)
            detail = f"HTTP {code}: failure reason 0x{reason:04X} {status_meaning(reason)}"
            return SendOutcome(False, kind, detail, retryable, status=reason, **what)
        return SendOutcome(False, STORE_FAILED, f"HTTP {code}: failed, no reason", True, **what)
    if stored is not None or code == 200:
        warning = _first_value(stored or {}, WARNING_REASON)
        if warning is not None:
            detail = f"HTTP {code}: warning 0x{warning:04X} {status_meaning(warning)}"
            return SendOutcome(True, SENT_WITH_WARNING, detail, False, status=warning, **what)
        return SendOutcome(True, SENT, f"HTTP {code} stored", False, status=0, **what)
    retryable = code >= 500 or code in RETRYABLE_HTTP or code == 202
    detail = f"HTTP {code} {response.reason_phrase}".strip()
    if code in (401, 403):
        detail += " (check the destination's token or client certificate)"
    return SendOutcome(False, STORE_FAILED, detail, retryable, **what)


def _encoded(path: Path, twin: bool) -> tuple[bytes, str, str]:
    """(bytes, SOP Class UID, SOP Instance UID) of a report file, or of its Enhanced SR twin."""
    if twin:
        ds = enhanced_twin_dataset(path)
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        return buffer.getvalue(), str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    data = path.read_bytes()
    ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
    return data, str(ds.SOPClassUID), str(ds.SOPInstanceUID)


def _post(
    client: httpx.Client, destination: DicomWebDestination, data: bytes, ids: tuple[str, str]
) -> SendOutcome:
    body, content_type = multipart_body([data])
    url = f"{destination.url}/studies"
    try:
        response = client.post(url, content=body, headers={"Content-Type": content_type})
    except httpx.HTTPError as exc:
        kind, detail = _http_failure(exc, url)
        return SendOutcome(False, kind, detail, True, sop_class_uid=ids[0], sop_instance_uid=ids[1])
    return stow_outcome(response, *ids)


def send_file(
    path: Path,
    fallback_path: Path | None,
    destination: DicomWebDestination,
    options: AssociationOptions | None = None,
) -> SendOutcome:
    """STOW-RS `path` to `destination`; its Enhanced SR fallback when the class is refused."""
    options = options or AssociationOptions()
    try:
        data, sop_class, sop_instance = _encoded(path, twin=False)
    except (OSError, InvalidDicomError, AttributeError) as exc:
        return SendOutcome(False, BAD_FILE, f"cannot read report file: {exc}", retryable=False)
    try:
        client = _client(destination, options)
    except (OSError, ssl.SSLError) as exc:
        return SendOutcome(
            False, CONNECT_FAILED, f"TLS setup failed for {destination.name}: {exc}", True
        )
    with client:
        outcome = _post(client, destination, data, (sop_class, sop_instance))
        if outcome.ok or outcome.status not in FALLBACK_TRIGGERS:
            _log(outcome, destination)
            return outcome
        if fallback_path is None and sop_class != Comprehensive3DSRStorage:
            return outcome
        log.warning(
            "main report refused, sending fallback",
            extra=kv(destination=destination.name, status=outcome.detail),
        )
        try:
            fallback = _encoded(fallback_path, False) if fallback_path else _encoded(path, True)
        except (OSError, InvalidDicomError, AttributeError) as exc:
            return SendOutcome(
                False, BAD_FILE, f"cannot read fallback file: {exc}", retryable=False
            )
        outcome = _post(client, destination, fallback[0], (fallback[1], fallback[2]))
    outcome = dataclasses.replace(outcome, fallback_used=True)
    _log(outcome, destination)
    return outcome


def _log(outcome: SendOutcome, destination: DicomWebDestination) -> None:
    if outcome.ok:
        log.info(
            "sent" if outcome.kind == SENT else "sent with warning status",
            extra=kv(
                destination=destination.name,
                kind=outcome.kind,
                status=outcome.detail,
                fallback=outcome.fallback_used,
            ),
        )


def find_instance(
    destination: DicomWebDestination,
    study_uid: str,
    sop_instance_uid: str,
    options: AssociationOptions | None = None,
) -> tuple[str, str]:
    """QIDO-RS at instance level for one SOP Instance UID: (FOUND | ABSENT | ..., detail)."""
    options = options or AssociationOptions()
    url = f"{destination.url}/studies/{study_uid}/instances"
    try:
        with _client(destination, options) as client:
            response = client.get(url, params={"SOPInstanceUID": sop_instance_uid})
    except (OSError, ssl.SSLError) as exc:
        return UNREACHABLE, f"TLS setup failed for {destination.name}: {exc}"
    except httpx.HTTPError as exc:
        return UNREACHABLE, _http_failure(exc, url)[1]
    code = response.status_code
    if code in (204, 404):
        return ABSENT, f"{sop_instance_uid} not found on {destination.name} (HTTP {code})"
    if code in (405, 501):
        return UNSUPPORTED, f"{destination.name} does not answer QIDO-RS (HTTP {code})"
    if code != 200:
        return QUERY_FAILED, f"QIDO-RS on {destination.name}: HTTP {code}"
    matches = _json(response)
    if not isinstance(matches, list):
        return QUERY_FAILED, f"QIDO-RS on {destination.name}: not a DICOM JSON list"
    for match in matches:
        value = ((match or {}).get(SOP_INSTANCE_UID) or {}).get("Value") or [None]
        if value[0] == sop_instance_uid:
            return FOUND, f"found by QIDO-RS on {destination.name}"
    return ABSENT, f"{sop_instance_uid} not found on {destination.name}"


def echo(
    destination: DicomWebDestination, options: AssociationOptions | None = None
) -> EchoOutcome:
    """Is the archive there and does it take our credentials (a one-study QIDO-RS)."""
    options = options or AssociationOptions()
    url = f"{destination.url}/studies"
    try:
        with _client(destination, options) as client:
            started = time.perf_counter()
            response = client.get(url, params={"limit": "1"})
            elapsed_ms = (time.perf_counter() - started) * 1000.0
    except (OSError, ssl.SSLError) as exc:
        return EchoOutcome(False, CONNECT_FAILED, f"TLS setup failed for {destination.name}: {exc}")
    except httpx.HTTPError as exc:
        return EchoOutcome(False, *_http_failure(exc, url))
    code = response.status_code
    if code in (200, 204):
        return EchoOutcome(True, ECHOED, f"HTTP {code}", round_trip_ms=round(elapsed_ms, 2))
    detail = f"HTTP {code} {response.reason_phrase}".strip()
    if code in (401, 403):
        detail += " (token or client certificate refused)"
    return EchoOutcome(False, ECHO_FAILED, detail)
