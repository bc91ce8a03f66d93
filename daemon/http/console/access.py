"""Who is looking at the console: a signed-in user (session cookie) or a bearer token.

Users are `[[http.users]]` (argon2 password hashes); a login opens a row in
`console_sessions` whose id is the sha256 of the random token the cookie carries, with a
CSRF token every form of that session must echo. Sessions end `[http] session_minutes`
after the login, or at logout. Scripts send an `Authorization: Bearer` token of
`[[http.tokens]]` instead (no cookie, so no CSRF). Client certificates and anonymous roles
do not open the console: its forms need a session or a token.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import secrets
from collections.abc import Callable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine, delete, insert, select
from starlette.requests import HTTPConnection

from daemon.config import HttpSettings, HttpUser
from daemon.db.schema import ConsoleSession, utcnow
from daemon.http.auth import OPERATE, READ, ROLE_GRANTS, VIA_TOKEN, HttpRefusal, Principal

SESSION_COOKIE = "pacsai_session"
# The login form's CSRF token, as a cookie the form must repeat (no session exists yet).
LOGIN_COOKIE = "pacsai_login"
COOKIE_PATH = "/console"
VIA_SESSION = "session"
TOKEN_BYTES = 32
# Why a visitor was sent to the login page (shown there, and logged).
NO_SESSION = "no session"
EXPIRED = "session expired"
__all__ = ["OPERATE", "READ"]


class LoginNeeded(HttpRefusal):
    """No usable session: pages send the browser to the login form, other requests get 401."""

    def __init__(self, reason: str) -> None:
        super().__init__(401, reason)


@dataclasses.dataclass(frozen=True)
class Visitor:
    """A principal allowed into the console; `csrf` is the token its forms carry (None for a
    bearer token: no cookie rides along, so nothing to forge)."""

    principal: Principal
    csrf: str | None

    @property
    def name(self) -> str:
        return self.principal.name

    @property
    def operator(self) -> bool:
        return self.principal.may(OPERATE)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def same(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a submitted token with the expected one."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class Users:
    """`[[http.users]]` by name; checking a password costs the same for unknown names."""

    def __init__(self, http: HttpSettings) -> None:
        self._users = {u.name: u for u in http.users}
        self._hasher = PasswordHasher()
        # Verified against when the name is unknown, so timing does not tell names apart.
        self._decoy = self._hasher.hash(secrets.token_urlsafe(16))

    def get(self, name: str) -> HttpUser | None:
        return self._users.get(name)

    def check(self, name: str, password: str) -> HttpUser | None:
        """The user when the password matches its hash, else None."""
        user = self._users.get(name)
        try:
            self._hasher.verify(user.password_hash if user else self._decoy, password)
        except (VerificationError, InvalidHashError):
            return None
        return user


class Sessions:
    """Console sessions as rows: opened at login, found per request, closed at logout."""

    def __init__(self, writer: Engine, reader: Engine, minutes: float) -> None:
        self._writer = writer
        self._reader = reader
        self._lifetime = dt.timedelta(minutes=minutes)

    @property
    def seconds(self) -> int:
        return int(self._lifetime.total_seconds())

    def open(self, user: HttpUser) -> str:
        """A new session for `user`; returns the cookie's token (only its sha256 is kept).
        Sessions that ended are removed on the way."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = utcnow()
        with self._writer.begin() as conn:
            conn.execute(delete(ConsoleSession).where(ConsoleSession.expires_at <= now))
            conn.execute(
                insert(ConsoleSession).values(
                    id=_digest(token),
                    user_name=user.name,
                    role=user.role,
                    csrf=secrets.token_urlsafe(TOKEN_BYTES),
                    created_at=now,
                    expires_at=now + self._lifetime,
                )
            )
        return token

    def find(self, token: str, users: Users) -> Visitor:
        """The visitor of a cookie's token; LoginNeeded when unknown, ended or its user gone."""
        with self._reader.connect() as conn:
            row = conn.execute(
                select(ConsoleSession).where(ConsoleSession.id == _digest(token))
            ).one_or_none()
        if row is None:
            raise LoginNeeded(NO_SESSION)
        if row.expires_at <= utcnow():
            raise LoginNeeded(EXPIRED)
        user = users.get(row.user_name)
        if user is None or user.role != row.role:
            raise LoginNeeded(NO_SESSION)  # removed or demoted since the login
        principal = Principal(row.user_name, ROLE_GRANTS[row.role], VIA_SESSION)
        return Visitor(principal, row.csrf)

    def close(self, token: str) -> None:
        """End a session (logout)."""
        with self._writer.begin() as conn:
            conn.execute(delete(ConsoleSession).where(ConsoleSession.id == _digest(token)))


def visitor(
    conn: HTTPConnection,
    sessions: Sessions,
    users: Users,
    identify: Callable[[HTTPConnection], Principal],
) -> Visitor:
    """Who calls: a bearer token (when the request sends one) or the session cookie."""
    if "authorization" in conn.headers:
        principal = identify(conn)
        if principal.via != VIA_TOKEN:
            raise LoginNeeded(NO_SESSION)
        if not principal.may(READ):
            raise HttpRefusal(403, f"token {principal.name!r} may not read the console")
        return Visitor(principal, None)
    token = conn.cookies.get(SESSION_COOKIE)
    if not token:
        raise LoginNeeded(NO_SESSION)
    return sessions.find(token, users)


def require_operator(who: Visitor) -> None:
    """403 unless the visitor may retry and cancel jobs."""
    if not who.operator:
        raise HttpRefusal(403, f"{who.principal.via} {who.name!r} may not {OPERATE}")


def check_csrf(who: Visitor, submitted: str | None) -> None:
    """403 unless a session's form carries its CSRF token (bearer requests carry none)."""
    if who.csrf is None:
        return
    if not same(submitted, who.csrf):
        raise HttpRefusal(403, "forged or missing CSRF token")
