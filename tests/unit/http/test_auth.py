"""Who may do what: tokens by role, client certificates, anonymous only when configured."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request

from daemon.config import HttpSettings
from daemon.http.auth import OPERATE, READ, STORE, Authenticator, HttpRefusal, token_sha256
from daemon.http.service import warn_if_open
from tests.pki import make_pki
from tests.unit.http.conftest import STOW_TYPE, Face, StartFace, ct, encode, multipart


def stow(face: Face, headers: dict[str, str], **kwargs: object) -> httpx.Response:
    return httpx.post(
        f"{face.dicomweb}/studies",
        content=multipart([encode(ct())]),
        headers={**headers, "Content-Type": STOW_TYPE},
        **kwargs,  # type: ignore[arg-type]
    )


def caller(authorization: str | None = None) -> Request:
    headers = [(b"authorization", authorization.encode())] if authorization else []
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers})


def test_roles_grant_what_their_names_say() -> None:
    roles = ("store", "read", "operator")
    tokens = [{"name": r, "sha256": token_sha256(f"token-{r}"), "role": r} for r in roles]
    auth = Authenticator(HttpSettings(tokens=tokens))
    grants = {r: auth.identify(caller(f"Bearer token-{r}")).permissions for r in roles}
    assert grants == {"store": {STORE}, "read": {READ}, "operator": {READ, OPERATE}}
    with pytest.raises(HttpRefusal) as refused:
        auth.authorize(caller("Bearer token-read"), STORE)
    assert refused.value.status_code == 403
    with pytest.raises(HttpRefusal) as refused:
        auth.identify(caller())
    assert refused.value.status_code == 401


def test_anonymous_clients_store_only_when_configured(start_face: StartFace) -> None:
    closed = start_face()
    assert stow(closed, {}).status_code == 401
    open_face = start_face(anonymous=["store"])
    assert stow(open_face, {}).status_code == 200
    assert open_face.rows()[-1].calling_ae == "anonymous"
    # A wrong token is refused, never taken for anonymous.
    assert stow(open_face, {"Authorization": "Bearer wrong"}).status_code == 401


def test_anonymous_access_and_no_credentials_are_warned_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert warn_if_open(HttpSettings(port=8080, anonymous=["store"]))
    assert "http.anonymous" in caplog.text
    caplog.clear()
    assert warn_if_open(HttpSettings(port=8080))
    assert "only health answers" in caplog.text
    entry = {"name": "x", "sha256": token_sha256("x"), "role": "store"}
    assert not warn_if_open(HttpSettings(port=8080, tokens=[entry]))


def test_metrics_need_the_read_permission(face: Face) -> None:
    assert httpx.get(f"{face.url}/metrics").status_code == 401
    assert httpx.get(f"{face.url}/metrics", headers=face.auth("store")).status_code == 403
    for role in ("read", "operator"):
        # No registry in this in-process face: past authorization, 404 says so.
        assert httpx.get(f"{face.url}/metrics", headers=face.auth(role)).status_code == 404


def test_health_answers_without_credentials(face: Face) -> None:
    assert httpx.get(f"{face.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{face.url}/readyz").json() == {"status": "ready"}


def test_cors_headers_only_when_origins_are_configured(start_face: StartFace) -> None:
    preflight = {
        "Origin": "https://viewer.example.org",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    plain = start_face()
    rsp = httpx.options(f"{plain.dicomweb}/studies", headers=preflight)
    assert "access-control-allow-origin" not in rsp.headers
    cors = start_face(cors_origins=["https://viewer.example.org"])
    rsp = httpx.options(f"{cors.dicomweb}/studies", headers=preflight)
    assert rsp.headers["access-control-allow-origin"] == "https://viewer.example.org"
    rsp = httpx.options(
        f"{cors.dicomweb}/studies", headers={**preflight, "Origin": "https://evil.example"}
    )
    assert rsp.headers.get("access-control-allow-origin") != "https://evil.example"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"), client_subject="/CN=modality-gw")


def mutual_tls(pki: Path) -> dict[str, object]:
    """`[http.tls]` with the test CA's server certificate; its clients get `store`."""
    return {
        "certificate": pki / "server.crt",
        "key": pki / "server.key",
        "ca": pki / "ca.crt",
        "client_role": "store",
    }


def _client_context(pki: Path, with_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if with_certificate:
        context.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    return context


def test_a_client_certificate_from_the_ca_authenticates_with_the_client_role(
    start_face: StartFace, pki: Path
) -> None:
    face = start_face(tls=mutual_tls(pki))
    assert face.url.startswith("https://")
    with_cert = stow(face, {}, verify=_client_context(pki, True))
    assert with_cert.status_code == 200
    assert face.rows()[-1].calling_ae == "modality-gw"
    # Without a certificate a token still works; with neither, 401.
    assert stow(face, face.auth(), verify=_client_context(pki, False)).status_code == 200
    assert stow(face, {}, verify=_client_context(pki, False)).status_code == 401


def test_a_certificate_from_another_ca_is_refused_at_the_handshake(
    start_face: StartFace, pki: Path, tmp_path: Path
) -> None:
    other = make_pki(tmp_path / "other")
    face = start_face(tls=mutual_tls(pki))
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(other / "client.crt"), str(other / "client.key"))
    with pytest.raises(httpx.HTTPError):
        stow(face, {}, verify=context)
    assert face.rows() == []
