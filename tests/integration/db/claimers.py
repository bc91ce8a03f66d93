"""Claimer processes for the queue tests; a module of its own so `spawn` children import little."""

from __future__ import annotations

import sys
import time
from multiprocessing.synchronize import Barrier
from typing import Any

from sqlalchemy import text

from daemon.db import queue
from daemon.db.engine import make_engine


def claim_until_empty(url: str, owner: str, kind: str, start: Barrier, results: Any) -> None:
    """Claim and complete jobs until none is left; report the ids claimed, in order."""
    engine = make_engine(url)
    with engine.connect() as conn:  # connect before the start line, so claims overlap
        conn.execute(text("SELECT 1"))
    claimed: list[int] = []
    try:
        start.wait(timeout=60)
        while (job := queue.claim(engine, owner, [kind], lease_seconds=60)) is not None:
            claimed.append(job.id)
            time.sleep(0.001)  # the job's work, outside any transaction, as a worker's is
            with engine.begin() as conn:
                queue.complete(conn, job.id, owner)
    finally:
        results.put((owner, claimed))
        engine.dispose()


def claim_one_and_hang(url: str, owner: str, kind: str, lease_seconds: float) -> None:
    """Claim one job, say which on stdout, then sleep until killed: a worker that dies mid-job."""
    engine = make_engine(url)
    job = queue.claim(engine, owner, [kind], lease_seconds=lease_seconds)
    print(job.id if job else "none", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    claim_one_and_hang(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
