"""Associations both ways: timeouts and PDU size, TLS contexts, and one way to start a server.

The receiver, the dispatcher, the verifier and the benchmarks all build pynetdicom AEs the
same way from here, so a timeout or a TLS rule changes in one place.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import threading
from collections.abc import Sequence
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from daemon.config import DicomSettings, TLSSettings
from daemon.dicom.transport import ReceiverRequestHandler, check_pynetdicom

# What small messages (C-ECHO, N-ACTION, C-FIND, reports) are proposed and accepted in.
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# How often a server thread looks whether it was asked to shut down.
POLL_SECONDS = 0.2


@dataclasses.dataclass(frozen=True)
class AssociationOptions:
    """Timeouts (seconds) and maximum PDU of one AE; `from_settings` for the daemon's own."""

    connect_timeout: float = 10.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_pdu: int = 262144

    @classmethod
    def from_settings(cls, dicom: DicomSettings) -> AssociationOptions:
        """The `[dicom]` timeouts, so outbound associations wait as long as inbound ones."""
        return cls(
            connect_timeout=dicom.acse_timeout,
            acse_timeout=dicom.acse_timeout,
            dimse_timeout=dicom.dimse_timeout,
            network_timeout=dicom.network_timeout,
            max_pdu=dicom.max_pdu,
        )

    def apply(self, ae: AE) -> AE:
        """Set these timeouts and the PDU size on `ae`; returns it."""
        ae.connection_timeout = self.connect_timeout
        ae.acse_timeout = self.acse_timeout
        ae.dimse_timeout = self.dimse_timeout
        ae.network_timeout = self.network_timeout
        ae.maximum_pdu_size = self.max_pdu
        return ae


def server_tls_context(tls: TLSSettings | None) -> ssl.SSLContext | None:
    """The server side of DICOM over TLS; with `ca`, clients must show a certificate it signed."""
    if tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tls.certificate), str(tls.key))
    if tls.ca is not None:
        ctx.load_verify_locations(str(tls.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_tls_args(tls: TLSSettings | None, host: str) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's `tls_args` for a client checking the peer against `ca` (or the system CAs)."""
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
    context.load_cert_chain(certfile=tls.certificate, keyfile=tls.key)
    return context, host


class ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's server, listening with SO_REUSEPORT so sibling processes share the port."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


@dataclasses.dataclass
class RunningServer:
    """A pynetdicom association server serving from its own thread."""

    server: ThreadedAssociationServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The TCP port it listens on (the one the kernel chose for port 0)."""
        return int(self.server.server_address[1])

    def shutdown(self) -> None:
        """Stop accepting, close the listening socket and wait for the thread."""
        self.server.shutdown()
        self.thread.join(timeout=5)


def start_server(
    ae: AE,
    address: tuple[str, int],
    handlers: Sequence[Any],
    *,
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
    prompt: bool = True,
    name: str = "dicom-scp",
) -> RunningServer:
    """Listen on `address` over the prompt transport (daemon.dicom.transport) and serve.

    pynetdicom's own `AE.start_server` cannot take a request handler; this one gives each
    association the receiver's transport (pynetdicom's own with `prompt=False`, for
    comparison) and registers the server with the AE, as `start_server` does, so
    `ae.shutdown()` finds it.
    """
    check_pynetdicom()
    server = ae.make_server(
        address,
        evt_handlers=list(handlers),
        ssl_context=ssl_context,
        server_class=ReusePortServer if reuse_port else ThreadedAssociationServer,
        request_handler=ReceiverRequestHandler if prompt else RequestHandler,
    )
    ae._servers.append(server)
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": POLL_SECONDS},
        name=f"{name}:{server.server_address[1]}",
        daemon=True,
    )
    thread.start()
    return RunningServer(server, thread)
