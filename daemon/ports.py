"""The TCP ports `serve` listens on, checked before anything starts so a taken one is one line.

Each listening part (the DICOM receiver, `/metrics`, the HTTP server) is a `Listen` naming
the setting it comes from. `probe` binds and closes each before the workers load their
models, so a second `serve` on a busy port stops within a second naming the setting
(`dicom.port 11112 is in use`); `binding` turns the same errors at the real bind (another
process took the port meanwhile) into the same words.
"""

from __future__ import annotations

import dataclasses
import errno
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class PortUnavailable(Exception):
    """A configured address cannot be listened on; the message names the setting."""


@dataclasses.dataclass(frozen=True)
class Listen:
    """One address `serve` listens on and the setting it comes from (e.g. `dicom.port`)."""

    setting: str
    bind: str
    port: int


def unavailable(listen: Listen, exc: OSError) -> PortUnavailable | None:
    """The one-line reason `exc` from binding `listen` stands for; None if not a bind error."""
    where = f"{listen.setting} {listen.port}"
    if exc.errno == errno.EADDRINUSE:
        return PortUnavailable(f"{where} is in use")
    if exc.errno == errno.EACCES:
        return PortUnavailable(
            f"{where}: permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return PortUnavailable(f"{where}: {listen.bind} is not an address of this host")
    if isinstance(exc, socket.gaierror):
        return PortUnavailable(f"{where}: cannot resolve {listen.bind!r} ({exc.strerror})")
    return None


def _address(listen: Listen) -> tuple[socket.AddressFamily, tuple[object, ...]]:
    infos = socket.getaddrinfo(
        listen.bind, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, _, _, _, address = infos[0]
    return family, address


def probe(listens: Iterable[Listen]) -> None:
    """Bind each address and let it go; raise `PortUnavailable` for the first that fails.

    The probe sets SO_REUSEADDR as the servers do, so a port with connections in TIME_WAIT
    is free and one another process listens on (with or without SO_REUSEPORT) is not.
    """
    for listen in listens:
        try:
            family, address = _address(listen)
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
        except OSError as exc:
            reason = unavailable(listen, exc)
            if reason is None:
                raise
            raise reason from exc


@contextmanager
def binding(listen: Listen) -> Iterator[None]:
    """Around a server's own bind: a bind error becomes `PortUnavailable` naming the setting."""
    try:
        yield
    except OSError as exc:
        reason = unavailable(listen, exc)
        if reason is None:
            raise
        raise reason from exc
