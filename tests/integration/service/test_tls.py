"""DICOM over TLS: a sender with a certificate from our CA stores; plain and unknown ones don't."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from daemon.db.engine import make_engine
from daemon.db.schema import Instance
from tests.daemon_proc import Daemon, storescu
from tests.integration.service.helpers import sop_uids
from tests.interop.conftest import daemon_config
from tests.peers import require_dcmtk

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        [OPENSSL, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr


def _signed(name: str, subject: str, ext: str, cwd: Path) -> None:
    """`name`.key and `name`.crt, signed by ca.key, with the given X.509v3 extensions."""
    (cwd / f"{name}.ext").write_text(ext)
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-subj",
        subject,
        "-out",
        f"{name}.csr",
        cwd=cwd,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-sha256",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.crt",
        cwd=cwd,
    )


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A throw-away CA with one server and one client certificate."""
    if not Path(OPENSSL).exists():
        pytest.skip("openssl not installed")
    out = tmp_path / "pki"
    out.mkdir()
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-subj",
        "/CN=pacs-ai test CA",
        "-days",
        "2",
        "-out",
        "ca.crt",
        cwd=out,
    )
    _signed(
        "server",
        "/CN=localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        out,
    )
    _signed("client", "/CN=STORESCU", "extendedKeyUsage=clientAuth\n", out)
    return out


def _stored_paths(database_url: str) -> dict[str, Path]:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(Instance.sop_instance_uid, Instance.path)).all()
    finally:
        engine.dispose()
    return {uid: Path(path) for uid, path in rows}


def test_storescu_with_a_client_certificate_stores_over_tls_and_plain_tcp_is_refused(
    tmp_path: Path, pki: Path, make_daemon: Callable[..., Daemon]
) -> None:
    require_dcmtk()
    from models.phantom import write_series

    models = tmp_path / "no-models"
    models.mkdir()
    database_url = f"sqlite:///{tmp_path / 'pacs-ai.db'}"
    tls = {"certificate": pki / "server.crt", "key": pki / "server.key", "ca": pki / "ca.crt"}
    config = daemon_config(
        tmp_path,
        models,
        database_url=database_url,
        workers={"count": 0},
        dicom={"drain_seconds": 2, "acse_timeout": 5},
    )
    config["dicom.tls"] = tls
    daemon = make_daemon(config).start()
    secure, plain, anonymous = (
        write_series(tmp_path / name, slices=1, rows=16, cols=16, seed=seed)
        for seed, name in enumerate(("secure", "plain", "anonymous"))
    )

    sent = storescu(
        daemon.port,
        secure,
        extra=[
            "+tls",
            str(pki / "client.key"),
            str(pki / "client.crt"),
            "+cf",
            str(pki / "ca.crt"),
        ],
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    stored = _stored_paths(database_url)
    [uid] = sop_uids(secure)
    assert uid in stored
    spool_file = stored[uid]
    if not spool_file.is_absolute():
        spool_file = tmp_path / "spool" / spool_file
    assert spool_file.is_file(), spool_file

    refused = storescu(daemon.port, plain)
    assert refused.returncode != 0, "a plain TCP association to the TLS port must fail"
    # A TLS sender without a certificate from our CA is refused too (the CA is configured).
    unknown = storescu(daemon.port, anonymous, extra=["+tla", "+cf", str(pki / "ca.crt")])
    assert unknown.returncode != 0, "a TLS sender without a client certificate must fail"
    assert set(_stored_paths(database_url)) == {uid}
