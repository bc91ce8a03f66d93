"""Operator console page times over a full database: each page must render in under 200 ms
with 10,000 studies and 1,000,000 instances, on SQLite and on PostgreSQL.

    python -m bench.console [--studies 10000] [--instances 100] [--repeats 7] [--db sqlite,postgres]

For each database: a fresh one (a SQLite file; a new PostgreSQL schema on 127.0.0.1:5432)
at the head migration, filled by `tests.console_rows.fill`: studies at every stage over 30
days, 22 results rows per analysed study, an SR per reported study (each row pointing at
one real SR of a 200-slice series), two 512x512 heatmaps every tenth study, the audit
chain; the fill time is printed, and PostgreSQL is then ANALYZEd, as autovacuum does after
a bulk load. Then the console's HTTP server in this process (as `serve` runs it: uvicorn,
the read-only engine) and a client signed in through the login form. Each page is
requested once (`first_ms`: what a first visit costs, e.g. the SR parsed before it is
kept) and then `--repeats` times: the figure is the median wall time of the whole request
on loopback (session look-up, queries, files, template, transfer). The Overview's very
first view walks the audit chain once (later views resume from the last row); it is
printed as page `first_overview`.

Lines ``RESULT console db=... page=... ms=... max_ms=...`` feed `python -m bench`'s table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

TARGET_MS = 200.0
PASSWORD = "bench-console-password"


@contextlib.contextmanager
def database(kind: str, workdir: Path) -> Iterator[str]:
    """A fresh, empty database URL of `kind`, removed afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'console.db'}"
        return
    from tests.conftest import drop_pg_schema, new_pg_schema_url

    url, schema = new_pg_schema_url()
    try:
        yield url
    finally:
        drop_pg_schema(schema)


def pages(uids: list[str]) -> dict[str, str]:
    """The URLs timed, by name (the study: the newest with heatmaps)."""
    study = next(u for i, u in reversed(list(enumerate(uids))) if i % 10 == 5)
    day = (dt.datetime.now(dt.UTC) - dt.timedelta(days=3)).date()
    return {
        "overview": "/console/",
        "overview_fragment": "/console/?fragment=1",
        "studies": "/console/studies",
        "studies_page_100": "/console/studies?page=100",
        "studies_failed": "/console/studies?state=failed",
        "studies_reported": "/console/studies?state=reported",
        "studies_waiting": "/console/studies?state=waiting",
        "studies_calling_ae": "/console/studies?calling_ae=US_ER",
        "studies_modality": "/console/studies?modality=MR",
        "studies_one_day": f"/console/studies?received_from={day}&received_to={day}",
        "study": f"/console/studies/{study}",
        "heatmap_png": f"/console/studies/{study}/heatmaps/{study}.8.0.png",
        "failures": "/console/failures",
    }


def run(kind: str, studies: int, per_study: int, repeats: int) -> int:
    import httpx
    from argon2 import PasswordHasher

    from daemon.config import Settings
    from daemon.db import migrate
    from daemon.db.engine import make_engine
    from daemon.http import HttpService
    from daemon.spool import Spool
    from tests.console_rows import fill, write_documents
    from tests.peers import free_port

    with tempfile.TemporaryDirectory(prefix="pacsai-bench-console-") as tmp:
        workdir = Path(tmp)
        with database(kind, workdir) as url:
            engine = make_engine(url)
            migrate.upgrade(engine)
            # Files as a 200-slice CT study makes them: the SR names every slice (an LSTM's
            # series finding), the heatmap is 512x512.
            docs = write_documents(workdir / "docs", slices=200, size=512)
            started = time.monotonic()
            filled = fill(engine, docs, studies=studies, instances_per_study=per_study)
            fill_s = time.monotonic() - started
            if kind == "postgres":
                # What autovacuum does minutes after such a bulk load (SQLite keeps no
                # statistics unless told, and pacs-ai never tells it: none there).
                with engine.connect() as conn:
                    conn.exec_driver_sql("ANALYZE")
                    conn.commit()
            print(
                f"{kind}: filled {studies} studies, {studies * per_study} instances "
                f"in {fill_s:.0f} s",
                flush=True,
            )
            user = {
                "name": "bench",
                "password_hash": PasswordHasher().hash(PASSWORD),
                "role": "operator",
            }
            settings = Settings(
                storage={"spool_dir": str(workdir / "spool"), "database_url": url},
                http={"bind": "127.0.0.1", "port": free_port(), "users": [user]},
                destinations=[
                    {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
                ],
            )
            spool = Spool(settings.storage.spool_dir)
            spool.prepare()
            service = HttpService(settings, engine, spool, None, health=list, ready=lambda: True)
            service.start()
            try:
                client = httpx.Client(base_url=f"http://127.0.0.1:{service.port}", timeout=60)
                form = client.get("/console/login").text
                csrf = re.search(r'name="csrf" value="([^"]+)"', form)
                assert csrf is not None
                client.post(
                    "/console/login",
                    data={
                        "user": "bench",
                        "password": PASSWORD,
                        "csrf": csrf.group(1),
                        "next": "/console/",
                    },
                )
                first = time.monotonic()
                assert client.get("/console/").status_code == 200
                first_ms = (time.monotonic() - first) * 1000
                print(
                    f"RESULT console db={kind} page=first_overview ms={first_ms:.1f} "
                    f"max_ms={first_ms:.1f} first_ms={first_ms:.1f} target_ms=-",
                    flush=True,
                )
                worst = 0.0
                for name, path in pages(filled.study_uids).items():
                    times: list[float] = []
                    first_ms = 0.0
                    for attempt in range(repeats + 1):
                        t0 = time.monotonic()
                        answer = client.get(path)
                        elapsed = (time.monotonic() - t0) * 1000
                        assert answer.status_code == 200, f"{path}: {answer.status_code}"
                        if attempt:
                            times.append(elapsed)
                        else:
                            first_ms = elapsed
                    ms = statistics.median(times)
                    worst = max(worst, ms)
                    print(
                        f"RESULT console db={kind} page={name} ms={ms:.1f} "
                        f"max_ms={max(times):.1f} first_ms={first_ms:.1f} "
                        f"target_ms={TARGET_MS:.0f} bytes={len(answer.content)}",
                        flush=True,
                    )
            finally:
                service.stop(1.0)
                engine.dispose()
    return 0 if worst < TARGET_MS else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--instances", type=int, default=100, help="per study")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--db", default="sqlite,postgres")
    args = parser.parse_args(argv)
    codes = [
        run(kind.strip(), args.studies, args.instances, args.repeats)
        for kind in args.db.split(",")
        if kind.strip()
    ]
    return max(codes, default=0)


if __name__ == "__main__":
    sys.exit(main())
