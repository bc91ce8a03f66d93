"""DICOMweb both ways with a real Orthanc and its DICOMweb plugin, on SQLite and PostgreSQL.

(a) pacs-ai delivers its SR (and heatmaps) by STOW-RS and confirms them by QIDO-RS;
(b) Orthanc pushes a study to pacs-ai with its own DICOMweb client and a bearer token, and
    the SR comes back to Orthanc.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import select

from daemon.db import audit
from daemon.db.engine import make_engine
from daemon.db.schema import AuditEvent, Instance
from daemon.http.auth import new_token
from tests.conftest import free_port
from tests.daemon_proc import Daemon, storescu, wait_for
from tests.interop.conftest import daemon_config
from tests.peers import Orthanc, require_dcmtk, require_orthanc_dicomweb


def _series(tmp_path: Path, seed: int) -> list[Path]:
    from models.phantom import write_series

    return write_series(
        tmp_path / f"series-{seed}", slices=6, rows=48, cols=48, lesion=True, seed=seed
    )


def _study_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _web_destination(orthanc: Orthanc) -> dict[str, Any]:
    return {
        "kind": "dicomweb",
        "name": "orthanc-web",
        "url": orthanc.dicomweb_url,
        "verify": "qido",
    }


def _dispatch_states(daemon: Daemon) -> dict[str, int]:
    return dict(daemon.cli_json("status", "--no-echo")["dispatches"])


def test_reports_reach_orthanc_by_stow_rs_and_are_confirmed_by_qido_rs(
    tmp_path: Path, demo_models: Path, database_url: str, make_daemon: Callable[..., Daemon]
) -> None:
    require_dcmtk()
    require_orthanc_dicomweb()
    with Orthanc(dicomweb=True) as orthanc:
        config = daemon_config(
            tmp_path,
            demo_models,
            database_url=database_url,
            destinations=[_web_destination(orthanc)],
        )
        daemon = make_daemon(config).start()
        files = _series(tmp_path, seed=11)
        assert storescu(daemon.port, files).returncode == 0
        study_uid = _study_uid(files)

        wait_for(lambda: orthanc.find_sr(study_uid), 180, "the SR in Orthanc")
        states = wait_for(
            lambda: (s := _dispatch_states(daemon)) and set(s) == {"confirmed"} and s,
            180,
            "every dispatch confirmed by QIDO-RS",
        )
        heatmaps = orthanc.find_instances(study_uid, "OT")
        assert heatmaps, "no heatmap reached Orthanc"
        assert states["confirmed"] == 1 + len(heatmaps)
        assert len(orthanc.find_sr(study_uid)) == 1
        status = daemon.cli_json("status")  # the probe is a QIDO-RS with our credentials
        (dest,) = status["destinations"]
        assert dest["kind"] == "dicomweb" and dest["echo_ok"], dest
        assert daemon.cli("audit", "verify").returncode == 0
        engine = make_engine(database_url)
        try:
            with engine.connect() as conn:
                delivered = (
                    conn.execute(
                        select(AuditEvent.detail).where(AuditEvent.event == audit.SR_DELIVERED)
                    )
                    .scalars()
                    .all()
                )
        finally:
            engine.dispose()
        assert len(delivered) == states["confirmed"]
        assert {d["destination"] for d in delivered} == {"orthanc-web"}


def _upload(orthanc: Orthanc, files: list[Path]) -> str:
    """Store files in Orthanc through its REST API; the Orthanc ID of their study."""
    study_id = ""
    for path in files:
        request = urllib.request.Request(
            f"{orthanc.url}/instances", data=path.read_bytes(), method="POST"
        )
        request.add_header("Content-Type", "application/dicom")
        with urllib.request.urlopen(request, timeout=30) as response:
            study_id = json.loads(response.read())["ParentStudy"]
    return study_id


def test_orthanc_pushes_a_study_by_stow_rs_with_a_token_and_the_sr_comes_back(
    tmp_path: Path, demo_models: Path, database_url: str, make_daemon: Callable[..., Daemon]
) -> None:
    require_orthanc_dicomweb()
    token, sha = new_token()
    http_port = free_port()
    server = {
        "Url": f"http://127.0.0.1:{http_port}/dicomweb/",
        "HttpHeaders": {"Authorization": f"Bearer {token}"},
    }
    with Orthanc(dicomweb=True, dicomweb_servers={"pacsai": server}) as orthanc:
        http = {
            "bind": "127.0.0.1",
            "port": http_port,
            "tokens": [{"name": "orthanc", "sha256": sha, "role": "store"}],
        }
        config = daemon_config(
            tmp_path,
            demo_models,
            database_url=database_url,
            http=http,
            destinations=[_web_destination(orthanc)],
        )
        daemon = make_daemon(config).start()
        files = _series(tmp_path, seed=12)
        study_uid = _study_uid(files)
        study_id = _upload(orthanc, files)

        orthanc.rest(
            "/dicom-web/servers/pacsai/stow", {"Resources": [study_id], "Synchronous": True}
        )

        engine = make_engine(database_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(select(Instance.sop_instance_uid, Instance.calling_ae)).all()
        finally:
            engine.dispose()
        assert len(rows) == len(files)
        assert {r.calling_ae for r in rows} == {"orthanc"}
        srs = wait_for(lambda: orthanc.find_sr(study_uid), 180, "the SR back in Orthanc")
        assert len(srs) == 1
        assert "stow-rs request" in daemon.log() and "principal=orthanc" in daemon.log()
