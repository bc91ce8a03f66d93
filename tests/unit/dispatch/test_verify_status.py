"""`pacs-ai status` counts confirmed deliveries and those a verifying destination still owes."""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import Engine

from daemon.config import Settings
from daemon.db import migrate
from daemon.db.engine import make_engine
from daemon.db.schema import Dispatch, Report, Study
from daemon.status import collect_status, render_status


def add_rows(engine: Engine, states: list[tuple[str, str]]) -> None:
    """One study and report per (destination, state) outbox row."""
    with engine.begin() as conn:
        for destination, state in states:
            study_id = conn.execute(
                Study.__table__.insert().values(study_uid=generate_uid()).returning(Study.id)
            ).scalar_one()
            report_id = conn.execute(
                Report.__table__.insert()
                .values(
                    study_id=study_id,
                    study_version=1,
                    sop_instance_uid=generate_uid(),
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                    path="r.dcm",
                )
                .returning(Report.id)
            ).scalar_one()
            conn.execute(
                Dispatch.__table__.insert().values(
                    report_id=report_id, destination=destination, state=state
                )
            )


def test_status_counts_confirmed_and_unconfirmed_deliveries(db_url: str, tmp_path: Path) -> None:
    engine = make_engine(db_url)
    migrate.upgrade(engine)
    add_rows(
        engine,
        [
            ("committing", "confirmed"),
            ("committing", "sent"),  # unconfirmed
            ("finding", "sent"),  # unconfirmed
            ("finding", "pending"),  # not delivered yet: neither
            ("plain", "sent"),  # verify = none: sent is final
        ],
    )
    engine.dispose()
    settings = Settings(
        storage={"spool_dir": str(tmp_path / "spool"), "database_url": db_url},
        destinations=[
            {"name": "committing", "ae_title": "A", "host": "h", "port": 1, "verify": "commitment"},
            {"name": "finding", "ae_title": "B", "host": "h", "port": 2, "verify": "find"},
            {"name": "plain", "ae_title": "C", "host": "h", "port": 3},
        ],
    )
    status = collect_status(settings, echo=False)
    assert status["deliveries"] == {"confirmed": 1, "unconfirmed": 2}
    assert "deliveries: confirmed 1   unconfirmed 2" in render_status(status)
