"""The audit chain on both databases: tampering is found, concurrent appenders keep one chain."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter

from sqlalchemy import Engine, delete, func, select, update

from daemon.db import audit
from daemon.db.schema import AuditEvent
from tests.integration.governance.appenders import append_many


def _append(engine: Engine, n: int) -> list[int]:
    for i in range(n):
        with engine.begin() as conn:
            audit.record(conn, audit.SR_DELIVERED, study_uid=f"1.2.{i}", destination="pacs")
    with engine.connect() as conn:
        return list(conn.execute(select(AuditEvent.id).order_by(AuditEvent.id)).scalars())


def _verify(engine: Engine) -> audit.ChainCheck:
    with engine.connect() as conn:
        return audit.verify(conn)


def test_stored_rows_verify_after_the_round_trip(engine: Engine) -> None:
    _append(engine, 3)
    with engine.begin() as conn:
        audit.record(conn, audit.ANALYSED, study_uid=None, weights_sha256="ab" * 32, n=[1, 2.5])
    assert str(_verify(engine)) == "audit chain intact: 4 rows"


def test_hand_edited_detail_is_found(engine: Engine) -> None:
    ids = _append(engine, 4)
    with engine.begin() as conn:
        conn.execute(
            update(AuditEvent).where(AuditEvent.id == ids[1]).values(detail={"destination": "x"})
        )
    check = _verify(engine)
    assert (check.broken_id, check.reason) == (ids[1], "hash does not match its content")


def test_deleted_row_is_found(engine: Engine) -> None:
    ids = _append(engine, 4)
    with engine.begin() as conn:
        conn.execute(delete(AuditEvent).where(AuditEvent.id == ids[2]))
    check = _verify(engine)
    assert str(check) == f"audit row {ids[3]} is broken: prev_hash does not match row {ids[1]}"


def _assert_one_chain(engine: Engine, expected: int) -> None:
    with engine.connect() as conn:
        rows = conn.execute(select(AuditEvent.prev_hash, AuditEvent.hash)).all()
        assert conn.execute(select(func.count(AuditEvent.id))).scalar_one() == expected
    # One chain: no two rows claim the same predecessor (a fork), and it verifies end to end.
    forks = [h for h, n in Counter(r.prev_hash for r in rows).items() if n > 1]
    assert forks == []
    assert str(_verify(engine)) == f"audit chain intact: {expected} rows"


def test_concurrent_threads_keep_one_chain(engine: Engine) -> None:
    threads, per_thread = 8, 25
    start = threading.Barrier(threads)

    def work(name: str) -> None:
        start.wait(timeout=30)
        for i in range(per_thread):
            with engine.begin() as conn:
                audit.record(conn, audit.ANALYSED, study_uid=f"1.2.{i}", appender=name)

    workers = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    _assert_one_chain(engine, threads * per_thread)


def test_concurrent_processes_keep_one_chain(pg_url: str) -> None:
    from daemon.db import migrate
    from daemon.db.engine import make_engine

    engine = make_engine(pg_url)
    migrate.upgrade(engine)
    processes, per_process = 4, 30
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(processes)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=append_many, args=(pg_url, f"p{i}", per_process, start, results))
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    done = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    try:
        assert sum(done.values()) == processes * per_process
        _assert_one_chain(engine, processes * per_process)
    finally:
        engine.dispose()


def test_second_appender_waits_for_the_first_to_commit(pg_url: str) -> None:
    """The advisory lock makes a second appender wait instead of reading the same tail."""
    from daemon.db import migrate
    from daemon.db.engine import make_engine

    engine = make_engine(pg_url)
    migrate.upgrade(engine)
    try:
        _append(engine, 1)
        first = engine.connect()
        second = engine.connect()
        with first.begin():
            audit.record(first, audit.ANALYSED, study_uid="1.2.a")
            blocked = threading.Event()
            finished = threading.Event()

            def other() -> None:
                blocked.set()
                with second.begin():
                    audit.record(second, audit.ANALYSED, study_uid="1.2.b")
                finished.set()

            t = threading.Thread(target=other)
            t.start()
            blocked.wait(5)
            # The second appender waits for the first one's commit instead of reading its tail.
            assert not finished.wait(1.0)
        t.join(timeout=30)
        assert finished.is_set()
        first.close()
        second.close()
        _assert_one_chain(engine, 3)
    finally:
        engine.dispose()
