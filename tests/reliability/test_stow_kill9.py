"""SIGKILL `serve` while STOW-RS requests stream in: every answered instance is there once.

Four clients send requests of several instances each, over and over; the whole process
group is killed once some requests were answered and others are on the wire. After the
kill every row names its bytes and no partial file is in the instance tree; each instance a
200 acknowledged has exactly one row; resending everything after a restart stores the rest,
each once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.daemon_proc import Daemon, wait_for
from tests.integration.http.conftest import http_config, no_models, serving
from tests.reliability import harness as h
from tests.unit.http.conftest import STOW_TYPE, encode, multipart, study

CLIENTS = 4
REQUESTS_PER_CLIENT = 6
INSTANCES_PER_REQUEST = 5


def test_serve_killed_during_stow_requests_keeps_each_answered_instance_once(
    tmp_path: Path, database_url: str, make_daemon: Callable[..., Daemon]
) -> None:
    config, tokens = http_config(
        tmp_path, no_models(tmp_path), database_url=database_url, workers={"count": 0}
    )
    requests = [[_request() for _ in range(REQUESTS_PER_CLIENT)] for _ in range(CLIENTS)]
    first = make_daemon(config)
    url = serving(first)
    headers = {"Authorization": f"Bearer {tokens['store']}", "Content-Type": STOW_TYPE}
    answered: list[list[str]] = []
    lock = threading.Lock()

    def client(mine: list[tuple[bytes, list[str]]]) -> None:
        for body, uids in mine:
            try:
                rsp = httpx.post(f"{url}/dicomweb/studies", content=body, headers=headers)
            except httpx.HTTPError:
                return  # the server died under us
            if rsp.status_code == 200:
                with lock:
                    answered.append(uids)

    threads = [threading.Thread(target=client, args=(mine,)) for mine in requests]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(answered) >= CLIENTS, 120, "some requests answered")
    first.kill()
    for thread in threads:
        thread.join(60)

    engine = h.daemon_database(first)
    try:
        spool = Path(config["storage"]["spool_dir"])
        h.assert_spool_holds_only_committed_instances(spool, engine, unnamed_allowed=True)
        rows = h.instance_rows(engine)
        uids = [r.sop_instance_uid for r in rows]
        assert len(uids) == len(set(uids)), "an instance has two rows"
        acknowledged = {uid for uids in answered for uid in uids}
        assert acknowledged <= set(uids), "an answered instance is missing after the kill"

        url = serving(make_daemon(config))
        for mine in requests:
            for body, _uids in mine:
                rsp = httpx.post(f"{url}/dicomweb/studies", content=body, headers=headers)
                assert rsp.status_code == 200, rsp.text
        h.assert_spool_holds_only_committed_instances(spool, engine)
        rows = h.instance_rows(engine)
        assert len(rows) == CLIENTS * REQUESTS_PER_CLIENT * INSTANCES_PER_REQUEST
        assert len({r.sop_instance_uid for r in rows}) == len(rows)
    finally:
        engine.dispose()


def _request() -> tuple[bytes, list[str]]:
    """A STOW-RS body of one new study's instances, and their SOP Instance UIDs."""
    datasets = study(INSTANCES_PER_REQUEST)
    return multipart([encode(ds) for ds in datasets]), [str(ds.SOPInstanceUID) for ds in datasets]
