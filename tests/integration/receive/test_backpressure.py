"""Back-pressure: a full spool or an unreachable database answer 0xA700, then recover."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from daemon.db import migrate
from daemon.db.engine import make_engine
from daemon.dicom import status
from daemon.spool import Spool
from tests.conftest import drop_pg_schema, free_port, new_pg_schema_url
from tests.integration.receive.helpers import associate, ct_dataset, instance_rows


def test_low_disk_space_answers_out_of_resources_then_recovers(
    sqlite_engine: Engine,
    start_receiver,
    port: int,
    spool_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    free = {"bytes": 10 * 2**20}
    spool = Spool(spool_dir, free_bytes=lambda _path: free["bytes"])
    start_receiver(sqlite_engine, spool=spool, min_free_mb=100)
    with caplog.at_level(logging.WARNING, logger="daemon.receive"):
        with associate(port) as assoc:
            first = assoc.send_c_store(ct_dataset())
            second = assoc.send_c_store(ct_dataset())
            free["bytes"] = 500 * 2**20
            third = assoc.send_c_store(ct_dataset())
    assert first.Status == second.Status == status.OUT_OF_RESOURCES
    assert third.Status == status.SUCCESS
    assert len(instance_rows(sqlite_engine)) == 1
    warnings = [r for r in caplog.records if "min_free_mb" in r.getMessage()]
    assert len(warnings) == 1, "the warning is rate-limited"


def test_real_disk_full_answers_out_of_resources(
    sqlite_engine: Engine, start_receiver, port: int, spool_dir: Path
) -> None:
    huge_mb = 2**40 // 2**20
    start_receiver(sqlite_engine, min_free_mb=huge_mb)
    with associate(port) as assoc:
        assert assoc.send_c_store(ct_dataset()).Status == status.OUT_OF_RESOURCES
    assert instance_rows(sqlite_engine) == []


def test_unreachable_database_answers_out_of_resources(
    start_receiver, port: int, spool_dir: Path
) -> None:
    closed = free_port()
    engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{closed}/test")
    start_receiver(engine)
    with associate(port) as assoc:
        assert assoc.send_c_store(ct_dataset()).Status == status.OUT_OF_RESOURCES
    engine.dispose()
    assert not [p for p in spool_dir.rglob("*.dcm") if "quarantine" not in p.parts]


def test_database_lost_then_restored_recovers_without_restart(start_receiver, port: int) -> None:
    url, schema = new_pg_schema_url()
    engine = make_engine(url)
    try:
        migrate.upgrade(engine)
        start_receiver(engine)
        admin = make_engine(url.split("?")[0])
        with associate(port) as assoc:
            assert assoc.send_c_store(ct_dataset()).Status == status.SUCCESS
            with admin.begin() as conn:
                conn.execute(text(f'ALTER SCHEMA "{schema}" RENAME TO "{schema}_away"'))
            try:
                assert assoc.send_c_store(ct_dataset()).Status == status.OUT_OF_RESOURCES
            finally:
                with admin.begin() as conn:
                    conn.execute(text(f'ALTER SCHEMA "{schema}_away" RENAME TO "{schema}"'))
            assert assoc.send_c_store(ct_dataset()).Status == status.SUCCESS
        admin.dispose()
        assert len(instance_rows(engine)) == 2
    finally:
        engine.dispose()
        drop_pg_schema(schema)
