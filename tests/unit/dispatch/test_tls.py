"""DICOM over TLS to a destination with `tls` set: certificates checked both ways."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from pydicom.uid import Comprehensive3DSRStorage

from daemon.config import Destination, TLSSettings
from daemon.dispatch.scu import CONNECT_FAILED, echo, send_file
from tests.peers import RecordingSCP

OPENSSL = shutil.which("openssl")


def _openssl(cwd: Path, *args: str) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True)


def _issue(cwd: Path, name: str) -> None:
    """A key and a certificate for 127.0.0.1 signed by the test CA."""
    (cwd / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl(cwd, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={name}")  # fmt: skip
    _openssl(cwd, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
             "-extfile", f"{name}.ext")  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA with a server and a client certificate."""
    if OPENSSL is None:
        pytest.skip("openssl not installed")
    cwd = tmp_path_factory.mktemp("pki")
    _openssl(cwd, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.pem", "-days", "1", "-subj", "/CN=pacs-ai test CA")  # fmt: skip
    _issue(cwd, "server")
    _issue(cwd, "client")
    return cwd


def server_context(pki: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki / "ca.pem")
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    return context


def tls_destination(scp: RecordingSCP, pki: Path, ca: Path) -> Destination:
    return Destination(
        name="secure",
        ae_title=scp.aet,
        host=scp.host,
        port=scp.port,
        tls=TLSSettings(certificate=pki / "client.pem", key=pki / "client.key", ca=ca),
    )


def test_report_goes_over_tls(pki: Path, sr_pair: tuple[Path, Path]) -> None:
    with RecordingSCP([Comprehensive3DSRStorage], ssl_context=server_context(pki)) as scp:
        dest = tls_destination(scp, pki, pki / "ca.pem")
        outcome = send_file(sr_pair[0], sr_pair[1], dest, "PACSAI")
        echoed = echo(dest, "PACSAI")
    assert outcome.ok, outcome.detail
    assert echoed.ok
    assert len(scp.received) == 1


def test_untrusted_server_certificate_is_refused(pki: Path, sr_pair: tuple[Path, Path]) -> None:
    # Trust only the client's own certificate as CA: the server's chain does not verify.
    with RecordingSCP([Comprehensive3DSRStorage], ssl_context=server_context(pki)) as scp:
        dest = tls_destination(scp, pki, pki / "client.pem")
        outcome = send_file(sr_pair[0], sr_pair[1], dest, "PACSAI")
    assert not outcome.ok
    assert outcome.kind == CONNECT_FAILED
    assert outcome.retryable
    assert scp.received == []


def test_missing_certificate_file_fails_without_raising(
    pki: Path, sr_pair: tuple[Path, Path]
) -> None:
    dest = Destination(
        name="secure",
        ae_title="X",
        host="127.0.0.1",
        port=1,
        tls=TLSSettings(certificate=pki / "nope.pem", key=pki / "nope.key"),
    )
    outcome = send_file(sr_pair[0], sr_pair[1], dest, "PACSAI")
    assert outcome.kind == CONNECT_FAILED
    assert "TLS setup failed" in outcome.detail
