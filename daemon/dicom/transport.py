"""pynetdicom's acceptor transport, bounded and made prompt for a receiver that senders wait on.

pynetdicom's DUL reactor polls: it checks its socket, and when nothing came it sleeps a
millisecond and looks again, and it reads each PDU 4 KiB at a time. A C-STORE's last PDU
and its response therefore each wait up to a millisecond, and a 512 KiB image costs 128
reads. `ReceiverSocket` makes the reactor's wait a `select` on the socket and on a wake-up
socket that the association's outgoing queue (`WakingQueue`) pokes, so the reactor moves
the moment data arrives or a response is queued (and still every millisecond at most, so
it keeps checking its timers as before); it reads each PDU with as few `recv_into` calls as
the kernel allows, and refuses a PDU longer than we agreed to take.

Written against pynetdicom 3.0: `AssociationSocket.ready`, `.recv` and `._shutdown_socket`
(which `close`, abort and the peer's closing after a release all call), and the
DUL's `to_provider_queue` and `_run_loop_delay` (the sleep between idle reactor loops).
`check_pynetdicom` names any of them a pynetdicom release no longer has, so the server
refuses to start instead of running with the patch silently unused.
"""

from __future__ import annotations

import queue
import select
import socket
import ssl
from typing import Any, cast

from pynetdicom import AE
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler

MIN_PDU_LIMIT = 2**20  # A-ASSOCIATE-RQ PDUs are not bound by the maximum PDU length
UNLIMITED_PDU_LIMIT = 64 * 2**20
# How long the reactor waits for incoming data before it looks at its timers and at what
# the association wants to send; pynetdicom sleeps this long between idle loops.
READY_WAIT = 0.001
# The reactor's own sleep between idle loops, on top of READY_WAIT.
IDLE_SLEEP = 0.0001


# pynetdicom internals the patch replaces or reads. An override of a method pynetdicom
# renamed would never be called, and a renamed attribute set here would be a new one
# nothing reads: both would leave the receiver slow and unbounded without a word.
SOCKET_METHODS = ("ready", "recv", "_shutdown_socket")
SOCKET_ATTRIBUTES = ("socket", "_is_connected", "event_queue")
DUL_ATTRIBUTES = ("socket", "to_provider_queue", "_run_loop_delay")
HANDLER_METHODS = ("_create_association",)
AE_ATTRIBUTES = ("_servers",)


def missing_internals(assoc: Association) -> list[str]:
    """The pynetdicom internals this module relies on that `assoc` (and its classes) lack."""
    missing = [
        f"AssociationSocket.{n}" for n in SOCKET_METHODS if not hasattr(AssociationSocket, n)
    ]
    ours, peer = socket.socketpair()
    with ours, peer:
        sock = AssociationSocket(assoc, client_socket=ours)
        missing += [f"AssociationSocket.{n}" for n in SOCKET_ATTRIBUTES if not hasattr(sock, n)]
    missing += [f"DULServiceProvider.{n}" for n in DUL_ATTRIBUTES if n not in vars(assoc.dul)]
    missing += [f"RequestHandler.{n}" for n in HANDLER_METHODS if not hasattr(RequestHandler, n)]
    missing += [f"AE.{n}" for n in AE_ATTRIBUTES if n not in vars(assoc.ae)]
    return missing


def check_pynetdicom() -> None:
    """Raise RuntimeError naming the internals this patch needs that pynetdicom no longer has."""
    missing = missing_internals(Association(AE(), MODE_ACCEPTOR))
    if missing:
        raise RuntimeError(
            "this pynetdicom lacks what daemon.dicom.transport patches: " + ", ".join(missing)
        )


def pdu_limit(max_pdu: int) -> int:
    """The longest PDU body we agree to read: our maximum PDU length (0: unlimited, then 64 MiB)."""
    return max(max_pdu, MIN_PDU_LIMIT) if max_pdu else UNLIMITED_PDU_LIMIT


class WakingQueue(queue.Queue[Any]):
    """The DUL's outgoing queue: each put wakes the reactor waiting in `ReceiverSocket.ready`."""

    def __init__(self, wake: socket.socket) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        try:
            self._wake.send(b"\0")
        except BlockingIOError:
            pass  # bytes already waiting: the reactor is awake
        except OSError:
            pass  # the association has closed its sockets; nothing waits any more


class ReceiverSocket(AssociationSocket):
    """An acceptor's socket that waits for data instead of sleeping, and reads PDUs whole.

    Not constructed: `ReceiverRequestHandler` gives the socket pynetdicom made this class
    (constructing a second one would announce the connection to the state machine twice).
    """

    limit: int = UNLIMITED_PDU_LIMIT
    woken_by: socket.socket
    wake: socket.socket

    @property
    def ready(self) -> bool:
        """Whether data can be read, waiting up to READY_WAIT for it or for a queued send."""
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # decrypted bytes that select cannot see
        try:
            readable, _, _ = select.select([sock, self.woken_by], [], [], READY_WAIT)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        if self.woken_by in readable:
            self.woken_by.recv(4096)
        return sock in readable

    def _shutdown_socket(self) -> None:
        """Close the connection and the wake-up sockets (every way pynetdicom ends one)."""
        super()._shutdown_socket()
        self.woken_by.close()
        self.wake.close()

    def recv(self, nr_bytes: int) -> bytearray:
        """Read `nr_bytes` (fewer when the peer closes); OSError for a PDU over the limit.

        An OSError is pynetdicom's "transport connection closed": pynetdicom would otherwise
        read whatever length a PDU header announces (up to 4 GiB) before anything looks at
        it, so one client could make the receiver hold gigabytes.
        """
        if nr_bytes > self.limit:
            raise OSError(f"PDU of {nr_bytes} bytes is longer than the {self.limit} we accept")
        sock = self.socket
        if sock is None:
            raise OSError("socket closed")
        data = bytearray(nr_bytes)
        view = memoryview(data)
        got = 0
        while got < nr_bytes:
            n = sock.recv_into(view[got:], nr_bytes - got)
            if not n:
                del view
                del data[got:]
                break
            got += n
        return data


def make_prompt(assoc: Association, max_pdu: int) -> ReceiverSocket:
    """Give an acceptor pynetdicom made, before it starts, a `ReceiverSocket` and a waking queue."""
    sock = assoc.dul.socket
    if sock is None:
        raise OSError("connection closed before the association started")
    woken_by, wake = socket.socketpair()
    woken_by.setblocking(False)
    wake.setblocking(False)
    sock.__class__ = ReceiverSocket
    prompt = cast(ReceiverSocket, sock)
    prompt.limit = pdu_limit(max_pdu)
    prompt.woken_by, prompt.wake = woken_by, wake
    # Nothing has been queued yet, and pynetdicom always reaches the queue through the DUL.
    assoc.dul.to_provider_queue = WakingQueue(wake)
    assoc.dul._run_loop_delay = IDLE_SLEEP
    return prompt


class ReceiverRequestHandler(RequestHandler):
    """pynetdicom's connection handler, making each association prompt (`make_prompt`)."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        make_prompt(assoc, self.ae.maximum_pdu_size)
        return assoc
