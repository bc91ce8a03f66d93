"""A throw-away certificate authority for TLS tests (openssl, by full path when on PATH)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


def _openssl(cwd: Path, *args: str) -> None:
    done = subprocess.run(
        [OPENSSL, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr


def issue(cwd: Path, name: str, subject: str, extensions: str) -> None:
    """`name`.key and `name`.crt signed by the CA in `cwd`."""
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl(cwd, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-subj", subject, "-out", f"{name}.csr")  # fmt: skip
    _openssl(cwd, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext",
             "-out", f"{name}.crt")  # fmt: skip


def make_pki(out: Path, client_subject: str = "/CN=client") -> Path:
    """ca.crt, server.{crt,key} for localhost/127.0.0.1 and client.{crt,key}, in `out`."""
    if not Path(OPENSSL).exists():
        pytest.skip("openssl not installed")
    out.mkdir(parents=True, exist_ok=True)
    _openssl(out, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-subj", "/CN=pacs-ai test CA", "-days", "2", "-out", "ca.crt")  # fmt: skip
    issue(out, "server", "/CN=localhost",
          "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")  # fmt: skip
    issue(out, "client", client_subject, "extendedKeyUsage=clientAuth\n")
    return out
