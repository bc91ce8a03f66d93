"""Each destination's last C-ECHO (or QIDO-RS probe), kept as a row.

`serve` probes every destination at start and then every `PROBE_SECONDS` while its HTTP
server runs, and `pacs-ai status` records the probes it makes: the console reads the last
answer from the table, so a page view never opens an association to the PACS.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

from sqlalchemy import Connection, Engine, insert, select, update

from daemon.config import Settings
from daemon.db.schema import DestinationProbe, utcnow
from daemon.dispatch.destinations import AnyDestination, echo
from daemon.dispatch.scu import EchoOutcome
from daemon.logsetup import kv

log = logging.getLogger(__name__)

PROBE_SECONDS = 60.0


@dataclasses.dataclass(frozen=True)
class LastProbe:
    """What a destination answered when it was last probed."""

    destination: str
    ok: bool
    answer: str
    probed_at: dt.datetime


def record(engine: Engine, destination: str, outcome: EchoOutcome) -> bool | None:
    """Keep `outcome` as the destination's last answer; returns the one it replaced (ok or not)."""
    now = utcnow()
    with engine.begin() as conn:
        before = conn.execute(
            select(DestinationProbe.ok).where(DestinationProbe.destination == destination)
        ).scalar_one_or_none()
        values = {"ok": outcome.ok, "answer": str(outcome)[:1000], "probed_at": now}
        if before is None:
            conn.execute(insert(DestinationProbe).values(destination=destination, **values))
        else:
            conn.execute(
                update(DestinationProbe)
                .where(DestinationProbe.destination == destination)
                .values(**values)
            )
    return before


def probe(engine: Engine, settings: Settings, destination: AnyDestination) -> EchoOutcome:
    """C-ECHO (or QIDO-RS) one destination and record the answer."""
    outcome = echo(destination, settings.dicom.ae_title)
    record(engine, destination.name, outcome)
    return outcome


def probe_all(engine: Engine, settings: Settings) -> None:
    """Probe every destination; a change of answer (up or down) is one log line."""
    for destination in settings.destinations:
        outcome = echo(destination, settings.dicom.ae_title)
        before = record(engine, destination.name, outcome)
        if before is None or before != outcome.ok:
            level = logging.INFO if outcome.ok else logging.WARNING
            log.log(
                level,
                "destination answers" if outcome.ok else "destination does not answer",
                extra=kv(destination=destination.name, echo=str(outcome)),
            )


def last_probes(conn: Connection, settings: Settings) -> dict[str, LastProbe]:
    """The last recorded answer of each configured destination (absent: never probed)."""
    names = [d.name for d in settings.destinations]
    rows = conn.execute(
        select(DestinationProbe).where(DestinationProbe.destination.in_(names))
    ).all()
    return {
        r.destination: LastProbe(r.destination, bool(r.ok), r.answer, r.probed_at) for r in rows
    }

