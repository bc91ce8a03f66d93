"""The console inside `pacs-ai serve`: found at once, fed by the service's own state."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import pydicom

from tests.daemon_proc import Daemon, storescu, wait_for
from tests.integration.http.conftest import http_config, no_models, serving
from tests.peers import free_port, require_dcmtk
from tests.unit.http.conftest import CT_SMALL


def test_serve_probes_destinations_at_start_and_the_console_shows_the_live_service(
    tmp_path: Path, make_daemon: Callable[..., Daemon]
) -> None:
    require_dcmtk()
    config, tokens = http_config(
        tmp_path,
        no_models(tmp_path),
        workers={"count": 0},
        destinations=[{"name": "gone", "ae_title": "NOBODY", "host": "127.0.0.1",
                       "port": free_port()}],
    )  # fmt: skip
    daemon = make_daemon(config)
    url = serving(daemon)
    wait_for(lambda: f"operator console url={url}/console/" in daemon.log(), 30, "its address")
    read = {"Authorization": f"Bearer {tokens['read']}", "Accept": "application/json"}
    overview = wait_for(  # the start-up probe comes right after the HTTP port opens
        lambda: (
            (o := httpx.get(f"{url}/console/", headers=read).json())["destinations"][0]["probed_at"]
            and o
        ),
        30,
        "the start-up probe",
    )
    assert overview["receiver_up"] is True and overview["associations"] == 0
    (gone,) = overview["destinations"]
    assert gone["name"] == "gone" and gone["ok"] is False and gone["probed_at"]
    assert storescu(daemon.port, [CT_SMALL]).returncode == 0
    uid = str(pydicom.dcmread(CT_SMALL, stop_before_pixels=True).StudyInstanceUID)
    study = wait_for(
        lambda: (
            (r := httpx.get(f"{url}/console/studies/{uid}", headers=read)).status_code == 200
            and r.json()
        ),
        30,
        "the study page",
    )
    assert study["study"]["calling_aes"] == ["STORESCU"]
    assert study["study"]["state"] in ("receiving", "waiting")
    printed = daemon.cli("http", "console")
    assert printed.returncode == 0 and f"console: {url}/console/" in printed.stdout
    assert daemon.stop() == 0


def test_http_console_says_how_to_log_in(tmp_path: Path) -> None:
    from tests.daemon_proc import run_cli, write_config

    config = write_config(tmp_path / "c.toml", {"http": {"bind": socket.gethostname(),
                                                          "port": 8080}})  # fmt: skip
    said = run_cli(config, "http", "console")
    assert said.returncode == 0
    assert f"console: http://{socket.gethostname()}:8080/console/" in said.stdout
    assert "pacs-ai http user NAME --role operator" in said.stdout
    off = run_cli(
        write_config(tmp_path / "off.toml", {"dicom": {"port": 11112}}), "http", "console"
    )
    assert off.returncode == 1 and "[http] port" in off.stderr
