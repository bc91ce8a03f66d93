"""pynetdicom's acceptor transport, bounded and made prompt for a receiver that senders wait on.

pynetdicom's DUL reactor polls: it checks its socket, and when nothing came it sleeps a
millisecond and looks again, and it reads each PDU 4 KiB at a time. A C-STORE's last PDU
therefore waits up to a millisecond before anything handles it, and a 512 KiB image costs
128 reads. `ReceiverSocket` makes the reactor's wait a `select` on the socket (it returns
the moment data arrives, and still every millisecond at most, so the reactor keeps checking
its timers and outgoing queue as before), reads each PDU with as few `recv_into` calls as
the kernel allows, and refuses a PDU longer than we agreed to take.

Written against pynetdicom 3.0: `AssociationSocket.ready` and `.recv`, and
`DULServiceProvider._run_loop_delay` (the sleep between idle reactor loops).
"""

from __future__ import annotations

import select
import ssl

from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler

MIN_PDU_LIMIT = 2**20  # A-ASSOCIATE-RQ PDUs are not bound by the maximum PDU length
UNLIMITED_PDU_LIMIT = 64 * 2**20
# How long the reactor waits for incoming data before it looks at its timers and at what
# the association wants to send; pynetdicom sleeps this long between idle loops.
READY_WAIT = 0.001
# The reactor's own sleep between idle loops, on top of READY_WAIT.
IDLE_SLEEP = 0.0001


def pdu_limit(max_pdu: int) -> int:
    """The longest PDU body we agree to read: our maximum PDU length (0: unlimited, then 64 MiB)."""
    return max(max_pdu, MIN_PDU_LIMIT) if max_pdu else UNLIMITED_PDU_LIMIT


class ReceiverSocket(AssociationSocket):
    """An acceptor's socket that waits for data instead of sleeping, and reads PDUs whole.

    Not constructed: `ReceiverRequestHandler` gives the socket pynetdicom made this class
    (constructing a second one would announce the connection to the state machine twice).
    """

    limit: int = UNLIMITED_PDU_LIMIT

    @property
    def ready(self) -> bool:
        """Whether data can be read, waiting up to READY_WAIT for some to arrive."""
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # decrypted bytes that select cannot see
        try:
            readable, _, _ = select.select([sock], [], [], READY_WAIT)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        return bool(readable)

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


class ReceiverRequestHandler(RequestHandler):
    """pynetdicom's connection handler, giving each association a `ReceiverSocket`."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        if sock is None:
            raise OSError("connection closed before the association started")
        sock.__class__ = ReceiverSocket
        sock.limit = pdu_limit(self.ae.maximum_pdu_size)
        assoc.dul._run_loop_delay = IDLE_SLEEP
        return assoc
