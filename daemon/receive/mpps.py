"""Modality Performed Procedure Step as SCP (PS3.4 Annex F): a modality says what it did.

N-CREATE opens a step (IN PROGRESS) for a study; N-SET ends it (COMPLETED or
DISCONTINUED) naming, in the Performed Series Sequence, every image it made. Each is a
committed row before we answer (daemon.db.mpps), and then `on_changed(study_uid)` tells
the assembler (daemon.assemble) to decide again whether the study is done (every study
the step names, and, when it ends, any holding a series it made): a step that ended with
all its images here closes the study version at once.

Refusals carry the status Annex F names: an N-CREATE without a required attribute
(0x0120/0x0121), a status other than IN PROGRESS (0x0106), a step that exists (0x0111);
an N-SET for a step we do not know (0x0112), for one already ended (0x0110, "may no
longer be updated"), ending without its series (0x0121).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from sqlalchemy import Engine

from daemon.db import mpps as steps
from daemon.dicom.mpps import MPPS_SOP_CLASS, MalformedStep, read_create, read_set
from daemon.dicom.status import (
    DUPLICATE_SOP_INSTANCE,
    NO_SUCH_OBJECT_INSTANCE,
    PROCESSING_FAILURE,
    RESOURCE_LIMITATION,
    SUCCESS,
)
from daemon.logsetup import kv
from daemon.receive.ingest import DB_UNAVAILABLE

log = logging.getLogger(__name__)

__all__ = ["MPPS_SOP_CLASS", "MppsScp"]

Answer = tuple[int | Dataset, Dataset | None]


def _refused(what: str, calling: str, step: str, status: int, error: str) -> Answer:
    log.warning(
        what, extra=kv(calling_ae=calling, step=step, status=f"0x{status:04X}", error=error)
    )
    return status, None


class MppsScp:
    """The N-CREATE and N-SET handlers of one receiver process."""

    def __init__(self, engine: Engine, on_changed: Callable[[str], None] | None) -> None:
        self._engine = engine
        self._on_changed = on_changed

    def _changed(self, study_uid: str) -> None:
        if self._on_changed is not None:
            self._on_changed(study_uid)

    def on_create(self, event: evt.Event) -> Answer:
        """EVT_N_CREATE: store the new step IN PROGRESS; never raises."""
        calling = event.assoc.requestor.ae_title
        given = event.request.AffectedSOPInstanceUID
        uid = str(given) if given else generate_uid()
        try:
            created = read_create(uid, event.attribute_list)
        except MalformedStep as exc:
            return _refused("mpps step refused", calling, uid, exc.status, str(exc))
        try:
            with self._engine.begin() as conn:
                stored = steps.create_step(conn, created, calling)
        except DB_UNAVAILABLE as exc:
            return _refused(
                "mpps step not recorded: database unavailable",
                calling,
                uid,
                RESOURCE_LIMITATION,
                type(exc).__name__,
            )
        if not stored:
            return _refused(
                "mpps step refused", calling, uid, DUPLICATE_SOP_INSTANCE, "the step exists"
            )
        log.info(
            "mpps step started",
            extra=kv(calling_ae=calling, step=uid, study=created.study_uid),
        )
        for study_uid in created.studies:
            self._changed(study_uid)
        reply = Dataset()
        if not given:  # PS3.7 10.1.5: the SCP names the instance it created
            reply.AffectedSOPInstanceUID = uid
        return SUCCESS, reply

    def on_set(self, event: evt.Event) -> Answer:
        """EVT_N_SET: update the step; one that ends makes the assembler decide; never raises."""
        calling = event.assoc.requestor.ae_title
        uid = str(event.request.RequestedSOPInstanceUID or "")
        try:
            change = read_set(event.modification_list)
            with self._engine.begin() as conn:
                outcome, row = steps.set_step(conn, uid, change)
                ended = outcome == steps.SetOutcome.APPLIED and row.state in steps.FINAL
                studies = steps.studies_of(conn, row.id) if ended else []
        except MalformedStep as exc:
            return _refused("mpps update refused", calling, uid, exc.status, str(exc))
        except DB_UNAVAILABLE as exc:
            return _refused(
                "mpps update not recorded: database unavailable",
                calling,
                uid,
                RESOURCE_LIMITATION,
                type(exc).__name__,
            )
        if outcome == steps.SetOutcome.UNKNOWN:
            return _refused(
                "mpps update refused", calling, uid, NO_SUCH_OBJECT_INSTANCE, "no such step"
            )
        if outcome == steps.SetOutcome.ENDED:
            return _refused(
                "mpps update refused",
                calling,
                uid,
                PROCESSING_FAILURE,
                f"the step is {row.state}: it may no longer be updated",
            )
        log.info(
            "mpps step updated",
            extra=kv(
                calling_ae=calling,
                step=uid,
                study=row.study_uid,
                state=row.state,
                instances=len(row.performed.get("instances", [])),
                reason=row.discontinued_reason,
            ),
        )
        for study_uid in studies:  # a step that ended: every study it may close
            self._changed(study_uid)
        return SUCCESS, None
