"""Who is calling: a bearer token (by its sha256), a client certificate, or nobody.

Every route group asks the same `Authenticator` for the caller's `Principal` and names the
permission it needs (`STORE`, `READ`, `OPERATE`); the roles of `[[http.tokens]]` grant them.
A refusal is an `HttpRefusal` (401 or 403) whose one log line never holds the token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection

from daemon.config import HttpSettings

# Permissions a route may require.
STORE = "store"
READ = "read"
OPERATE = "operate"

# What each role of [[http.tokens]] (and [http.tls] client_role, [http] anonymous) grants.
ROLE_GRANTS: Mapping[str, frozenset[str]] = {
    "store": frozenset({STORE}),
    "read": frozenset({READ}),
    "operator": frozenset({READ, OPERATE}),
}

# How a principal proved who it is.
VIA_TOKEN = "token"
VIA_CERTIFICATE = "certificate"
VIA_ANONYMOUS = "anonymous"
ANONYMOUS = "anonymous"

TOKEN_BYTES = 32


class HttpRefusal(HTTPException):
    """A request answered with `status_code` and a one-line `detail`; the app logs it once."""

    def __init__(self, status: int, reason: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status, reason, dict(headers or {}))


@dataclasses.dataclass(frozen=True)
class Principal:
    """An authenticated caller: its name (recorded as the sender) and what it may do."""

    name: str
    permissions: frozenset[str]
    via: str

    def may(self, permission: str) -> bool:
        return permission in self.permissions


def new_token() -> tuple[str, str]:
    """A fresh random bearer token and its sha256 (what the configuration keeps)."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    return token, token_sha256(token)


def token_sha256(token: str) -> str:
    """The hex sha256 a token is listed by in `[[http.tokens]]`."""
    return hashlib.sha256(token.encode()).hexdigest()


def _grants(roles: list[str] | tuple[str, ...]) -> frozenset[str]:
    return frozenset().union(*(ROLE_GRANTS[r] for r in roles)) if roles else frozenset()


def certificate_name(tls: Mapping[str, Any] | None) -> str | None:
    """The common name of a verified client certificate (ASGI TLS extension), if any."""
    if not tls or not tls.get("client_cert_name"):
        return None
    for part in str(tls["client_cert_name"]).split(","):
        key, _, value = part.strip().partition("=")
        if key.upper() == "CN" and value:
            return value
    return str(tls["client_cert_name"])


class Authenticator:
    """Tells principals from credentials, as `[http]` configures them.

    Order: a bearer token when one is sent (a wrong one is refused, never downgraded to
    anonymous), then a verified client certificate (`[http.tls] client_role`), then the
    anonymous roles (`[http] anonymous`).
    """

    def __init__(self, http: HttpSettings) -> None:
        self._tokens = {
            t.sha256: Principal(t.name, _grants([t.role]), VIA_TOKEN) for t in http.tokens
        }
        tls = http.tls
        self._client_grants = _grants([tls.client_role]) if tls and tls.client_role else None
        anonymous = _grants(tuple(http.anonymous))
        self._anonymous = Principal(ANONYMOUS, anonymous, VIA_ANONYMOUS) if anonymous else None

    def identify(self, conn: HTTPConnection) -> Principal:
        """The caller, or HttpRefusal(401) naming what was wrong (never the token itself)."""
        header = conn.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise _unauthorized("authorization is not a bearer token")
            principal = self._tokens.get(token_sha256(token.strip()))
            if principal is None:
                raise _unauthorized("unknown token")
            return principal
        name = certificate_name(conn.scope.get("extensions", {}).get("tls"))
        if name is not None and self._client_grants is not None:
            return Principal(name, self._client_grants, VIA_CERTIFICATE)
        if self._anonymous is not None:
            return self._anonymous
        raise _unauthorized("no credentials")

    def authorize(self, conn: HTTPConnection, permission: str) -> Principal:
        """The caller when it may `permission`; HttpRefusal 401 or 403 otherwise."""
        principal = self.identify(conn)
        if not principal.may(permission):
            raise HttpRefusal(403, f"{principal.via} {principal.name!r} may not {permission}")
        return principal


def _unauthorized(reason: str) -> HttpRefusal:
    return HttpRefusal(401, reason, {"WWW-Authenticate": 'Bearer realm="pacs-ai"'})
