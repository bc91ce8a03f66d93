"""Each destination's last C-ECHO shows on the Overview as recorded: page views never probe."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, select

from daemon.config import Settings
from daemon.db.schema import DestinationProbe
from daemon.http import HttpService
from daemon.spool import Spool
from daemon.status import collect_status
from tests.peers import RecordingSCP, free_port
from tests.unit.http.conftest import role_tokens

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def pacs() -> Iterator[RecordingSCP]:
    with RecordingSCP([CT]) as scp:
        yield scp


def probes(engine: Engine) -> dict[str, tuple[bool, object]]:
    with engine.connect() as conn:
        rows = conn.execute(select(DestinationProbe)).all()
    return {r.destination: (r.ok, r.probed_at) for r in rows}


def test_status_records_probes_and_the_overview_shows_them_without_probing(
    engine: Engine, tmp_path: Path, pacs: RecordingSCP
) -> None:
    tokens, entries = role_tokens(("read",))
    settings = Settings(
        storage={"spool_dir": str(tmp_path / "spool"),
                 "database_url": engine.url.render_as_string(hide_password=False)},
        http={"bind": "127.0.0.1", "port": free_port(), "tokens": entries},
        destinations=[
            {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port},
            {"name": "gone", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()},
        ],
    )  # fmt: skip
    report = collect_status(settings)
    assert [d["echo_ok"] for d in report["destinations"]] == [True, False]
    recorded = probes(engine)
    assert {name: ok for name, (ok, _) in recorded.items()} == {"pacs": True, "gone": False}
    spool = Spool(settings.storage.spool_dir)
    spool.prepare()
    service = HttpService(settings, engine, spool, None, health=list, ready=lambda: True)
    service.start()
    try:
        overview = httpx.get(
            f"http://127.0.0.1:{service.port}/console/",
            headers={"Authorization": f"Bearer {tokens['read']}", "Accept": "application/json"},
        ).json()
    finally:
        service.stop(1.0)
    shown = {d["name"]: (d["ok"], d["answer"]) for d in overview["destinations"]}
    assert shown["pacs"][0] is True and shown["gone"][0] is False
    assert "refused" in shown["gone"][1] or "failed" in shown["gone"][1]
    assert probes(engine) == recorded  # the page read the rows; it probed nobody
