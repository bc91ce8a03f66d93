"""The HTTP server of `serve`: uvicorn (h11) on a thread of its own, bound before READY=1.

uvicorn runs the ASGI app; this module adds what a service facing the hospital network
needs and uvicorn lacks: the request line and headers must arrive within
`[http] header_timeout` (a silent or one-byte-a-second client is answered 408 and closed),
oversized headers are answered 431 (uvicorn says 400), each such refusal is one log line
with the peer, and a verified client certificate reaches the app as the ASGI TLS extension.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
import threading
import time
from typing import Any

import h11
from uvicorn import Config, Server
from uvicorn.protocols.http.h11_impl import H11Protocol

from daemon.config import HttpSettings
from daemon.logsetup import kv

log = logging.getLogger(__name__)

# The request line plus headers may not exceed this (h11's limit for an incomplete event).
MAX_HEADER_BYTES = 16384
START_TIMEOUT = 10.0
INVALID_REQUEST = "Invalid HTTP request received."
ASGIApp = Any


class HttpStartError(Exception):
    """The server cannot start; the message names the setting (`http.port: ...`)."""


def _respond_and_close(
    transport: asyncio.BaseTransport, status: int, phrase: str, text: str
) -> None:
    """Write a complete response outside h11 (no request was parsed) and close."""
    body = (text + "\n").encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode()
    transport.write(head + body)  # type: ignore[attr-defined]
    transport.close()


class _ConnectionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """uvicorn's per-connection logger, minus the line our refusal line replaces."""

    @property
    def level(self) -> int:
        return self.logger.level

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if msg != INVALID_REQUEST:
            super().log(level, msg, *args, **kwargs)


def _tls_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The ASGI TLS extension for a connection: the verified client certificate's subject."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert() or {}
    subject = ",".join(
        f"{'CN' if key == 'commonName' else key}={value}"
        for rdn in reversed(cert.get("subject", ()))
        for key, value in rdn
    )
    return {"client_cert_name": subject or None, "tls_version": ssl_object.version()}


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, 431 and one refusal line per peer."""

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = _ConnectionLog(logging.getLogger("uvicorn.error"), {})  # type: ignore[assignment]
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._head = bytearray()  # the start of a request, until its headers end

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        tls = _tls_extension(transport)
        if tls is not None:
            self.app = functools.partial(_with_tls, self.app, tls)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._arm_header_timer()
            if self._headers_too_long(data):
                reason = f"request headers longer than {MAX_HEADER_BYTES} bytes"
                self._refusal(431, reason)
                _respond_and_close(self.transport, 431, "Request Header Fields Too Large", reason)
                return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_header_timer()
            self._head.clear()

    def _headers_too_long(self, data: bytes) -> bool:
        """Whether the request line and headers run past MAX_HEADER_BYTES (h11 only checks
        what is still incomplete, so a long block arriving at once would pass it)."""
        if len(self._head) > MAX_HEADER_BYTES:
            return False  # ended within the limit already
        self._head += data[: MAX_HEADER_BYTES + 4 - len(self._head)]
        return b"\r\n\r\n" not in self._head and len(self._head) > MAX_HEADER_BYTES

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self._header_timeout, self._headers_late)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        reason = f"request headers not received within {self._header_timeout:g} s"
        self._refusal(408, reason)
        _respond_and_close(self.transport, 408, "Request Timeout", reason)

    def send_400_response(self, msg: str) -> None:
        self._refusal(400, "malformed HTTP request")
        super().send_400_response(msg)

    def _refusal(self, status: int, reason: str) -> None:
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
        log.warning("http request refused", extra=kv(status=status, reason=reason, peer=peer))


async def _with_tls(app: ASGIApp, tls: dict[str, Any], scope: Any, receive: Any, send: Any) -> None:
    scope.setdefault("extensions", {})["tls"] = tls
    await app(scope, receive, send)


def server_ssl_context(http: HttpSettings) -> ssl.SSLContext | None:
    """HTTPS with `[http.tls]`; with `ca`, client certificates it signed are asked for."""
    tls = http.tls
    if tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(tls.certificate), str(tls.key))
    except (OSError, ssl.SSLError) as exc:
        raise HttpStartError(f"http.tls.certificate: cannot load {tls.certificate}: {exc}") from exc
    if tls.ca is not None:
        try:
            ctx.load_verify_locations(str(tls.ca))
        except (OSError, ssl.SSLError) as exc:
            raise HttpStartError(f"http.tls.ca: cannot load {tls.ca}: {exc}") from exc
        # Optional: token clients (and health checks) need no certificate; one that is
        # presented must verify.
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def bind_socket(http: HttpSettings) -> socket.socket:
    """The listening socket, bound now so a port in use fails the start naming it."""
    family = socket.AF_INET6 if ":" in http.bind else socket.AF_INET
    # IPPROTO_TCP named, or asyncio leaves Nagle on for the accepted connections (it sets
    # TCP_NODELAY only on sockets that say TCP): every kept-alive response then waited
    # ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((http.bind, http.port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise HttpStartError(
            f"http.port: cannot listen on {http.bind}:{http.port}: {exc.strerror or exc}"
        ) from exc
    sock.setblocking(False)
    return sock


class HttpServer:
    """uvicorn serving `app` on a daemon thread; `start` returns once the port accepts."""

    def __init__(self, http: HttpSettings, app: ASGIApp) -> None:
        self.http = http
        self._app = app
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.port = http.port

    def start(self) -> None:
        """Bind, then serve from a thread; HttpStartError names the setting that failed."""
        context = server_ssl_context(self.http)
        sock = bind_socket(self.http)
        self.port = int(sock.getsockname()[1])
        config = Config(
            self._app,
            http=functools.partial(_Protocol, header_timeout=self.http.header_timeout),  # type: ignore[arg-type]
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_keep_alive=self.http.keepalive_timeout,  # type: ignore[arg-type]
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            ssl_context_factory=(lambda _config, _default: context) if context else None,
        )
        server = Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="http-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise HttpStartError(
                    f"http.port: server on {self.http.bind}:{self.port} did not start"
                )
            time.sleep(0.01)
        log.info(
            "http server listening",
            extra=kv(bind=self.http.bind, port=self.port, scheme="https" if context else "http"),
        )

    def alive(self) -> bool:
        """Whether the server thread runs (for the service's health)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, drain_seconds: float) -> None:
        """Stop accepting, let running requests finish for `drain_seconds`, then close."""
        if self._server is None or self._thread is None:
            return
        self._server.config.timeout_graceful_shutdown = max(drain_seconds, 0.1)  # type: ignore[assignment]
        self._server.should_exit = True
        if drain_seconds <= 0:
            self._server.force_exit = True  # a second SIGTERM: do not wait for anyone
        self._thread.join(drain_seconds + 5.0)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(5.0)
        if not self._stopped:
            self._stopped = True
            log.info("http server stopped", extra=kv(port=self.port))
