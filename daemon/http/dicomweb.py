"""DICOMweb under /dicomweb: STOW-RS (PS3.18 10.5) into the same ingest as C-STORE.

The route parses and streams; `Ingestor.store_uploads` decides, exactly as it does for
C-STORE; the answers become the PS3.18 Store Instances Response (Annex I) in DICOM JSON:

- 200: every instance stored (duplicates included);
- 202: some stored, the others listed in FailedSOPSequence with the C-STORE status the
  DIMSE path answers (0xC001 unparsable, 0xC002 missing UID, 0xC003 invalid UID,
  0xC005 series in another study, 0xA700 out of resources) or 0x0110 (study mismatch);
- 409: none stored; 503 with Retry-After when none was stored for want of resources.
Requests that cannot be read at all get 400, 406, 408, 413 or 415 and store nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from daemon.dicom import status
from daemon.http.auth import STORE, HttpRefusal
from daemon.http.body import BodyLimits
from daemon.http.context import context, peer
from daemon.http.multipart import PartWriter, stow_boundary
from daemon.logsetup import kv
from daemon.receive.ingest import Answer
from daemon.spool import InvalidUID, check_uid

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
ACCEPTED = ("application/dicom+json", "application/json", "application/*", "*/*")
RETRY_AFTER_SECONDS = 30
# DICOM JSON tags of the Store Instances Response (PS3.18 Table I.1-1).
RETRIEVE_URL = "00081190"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
FAILURE_REASON = "00081197"
REFERENCED_SOP_CLASS = "00081150"
REFERENCED_SOP_INSTANCE = "00081155"


def _check_accept(accept: str | None) -> None:
    """406 when the client accepts no DICOM JSON (the only response form given)."""
    if not accept:
        return
    offered = [item.split(";")[0].strip().lower() for item in accept.split(",")]
    if not any(media in ACCEPTED for media in offered):
        raise HttpRefusal(406, f"cannot answer in {accept[:80]}; only {DICOM_JSON}")


def _study_from_path(request: Request) -> str | None:
    study = request.path_params.get("study")
    if study is None:
        return None
    try:
        return check_uid(study)
    except InvalidUID as exc:
        raise HttpRefusal(400, f"study in the path: {exc}") from exc


def _reference(answer: Answer) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if answer.ids is not None:
        item[REFERENCED_SOP_CLASS] = {"vr": "UI", "Value": [answer.ids.sop_class_uid]}
        item[REFERENCED_SOP_INSTANCE] = {"vr": "UI", "Value": [answer.ids.sop_instance_uid]}
    return item


def store_instances_response(answers: list[Answer]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and the PS3.18 Store Instances Response for one request's answers."""
    stored = [a for a in answers if a.ok]
    failed = [a for a in answers if not a.ok]
    body: dict[str, Any] = {RETRIEVE_URL: {"vr": "UR"}}  # type 2: no WADO-RS here
    if stored:
        body[REFERENCED_SOP_SEQUENCE] = {
            "vr": "SQ",
            "Value": [{**_reference(a), RETRIEVE_URL: {"vr": "UR"}} for a in stored],
        }
    if failed:
        body[FAILED_SOP_SEQUENCE] = {
            "vr": "SQ",
            "Value": [
                {**_reference(a), FAILURE_REASON: {"vr": "US", "Value": [a.status]}} for a in failed
            ],
        }
    if not failed:
        return 200, body
    if stored:
        return 202, body
    if all(a.status & 0xFF00 == status.OUT_OF_RESOURCES for a in failed):
        return 503, body
    return 409, body


async def store(request: Request) -> Response:
    """STOW-RS: POST /dicomweb/studies[/{study}] with multipart/related; type=application/dicom."""
    started = time.monotonic()
    ctx = context(request)
    principal = ctx.auth.authorize(request, STORE)
    study = _study_from_path(request)
    boundary = stow_boundary(request.headers.get("content-type"))
    _check_accept(request.headers.get("accept"))
    limits = BodyLimits(ctx.settings.http)
    limits.check_declared(request)
    writer = PartWriter(ctx.ingestor, boundary, principal.name, peer(request), study)
    received = 0
    feeding: asyncio.Future[None] | None = None
    try:
        # Double-buffered: a worker thread parses and writes one batch while the next arrives.
        async for batch in limits.read(request):
            received += len(batch)
            if feeding is not None:
                await feeding
            feeding = asyncio.ensure_future(run_in_threadpool(writer.feed, batch))
        if feeding is not None:
            await feeding
        admitted = writer.finish()
        answers = await run_in_threadpool(ctx.ingestor.commit_admitted, admitted)
        await run_in_threadpool(writer.discard)
    except BaseException as exc:
        if feeding is not None and not feeding.done():
            await asyncio.wait([feeding])  # the writer is not thread-safe: let it finish
        await run_in_threadpool(writer.discard)
        if not isinstance(exc, ClientDisconnect):
            raise
        log.warning(
            "stow-rs request abandoned by the client: nothing stored",
            extra=kv(peer=peer(request), principal=principal.name, received=received),
        )
        return Response(status_code=400)  # nobody reads it
    code, body = store_instances_response(answers)
    ctx.count_instances(principal.name, answers)
    stored = sum(1 for a in answers if a.ok)
    log.info(
        "stow-rs request",
        extra=kv(
            status=code,
            stored=stored,
            failed=len(answers) - stored,
            study=study or "-",
            principal=principal.name,
            peer=peer(request),
            bytes=received,
            seconds=round(time.monotonic() - started, 3),
        ),
    )
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if code == 503 else None
    content = json.dumps(body, separators=(",", ":")).encode()
    return Response(content, status_code=code, media_type=DICOM_JSON, headers=headers)


def routes() -> list[BaseRoute]:
    """The DICOMweb route group, mounted at /dicomweb."""
    return [
        Route("/studies", store, methods=["POST"]),
        Route("/studies/{study}", store, methods=["POST"]),
    ]
