"""The receiver's transport: PDUs read whole and bounded, a reactor woken by data or a reply."""

from __future__ import annotations

import inspect
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, dul, evt, transport
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification
from pynetdicom.transport import AssociationSocket

from daemon.dicom.network import start_server
from daemon.dicom.transport import (
    DUL_ATTRIBUTES,
    MIN_PDU_LIMIT,
    SOCKET_METHODS,
    UNLIMITED_PDU_LIMIT,
    ReceiverSocket,
    check_pynetdicom,
    make_prompt,
    missing_internals,
    pdu_limit,
)


@pytest.fixture
def connection() -> Iterator[tuple[Association, ReceiverSocket, socket.socket]]:
    """An acceptor made prompt on one end of a socket pair; the test is the peer."""
    ours, peer = socket.socketpair()
    assoc = Association(AE(), MODE_ACCEPTOR)
    assoc.set_socket(AssociationSocket(assoc, client_socket=ours))
    sock = make_prompt(assoc, max_pdu=MIN_PDU_LIMIT)
    yield assoc, sock, peer
    sock._shutdown_socket()
    peer.close()


def test_pdu_limit_is_the_maximum_pdu_length_but_never_below_an_association_request() -> None:
    assert pdu_limit(16384) == MIN_PDU_LIMIT
    assert pdu_limit(4 * MIN_PDU_LIMIT) == 4 * MIN_PDU_LIMIT
    assert pdu_limit(0) == UNLIMITED_PDU_LIMIT


def test_a_pdu_sent_in_pieces_is_read_whole(
    connection: tuple[Association, ReceiverSocket, socket.socket],
) -> None:
    _, sock, peer = connection
    body = os.urandom(300_000)

    def send_in_pieces() -> None:
        for start in range(0, len(body), 7000):
            peer.sendall(body[start : start + 7000])

    sender = threading.Thread(target=send_in_pieces)
    sender.start()
    assert sock.recv(len(body)) == body
    sender.join()


def test_a_peer_closing_mid_pdu_gives_the_bytes_that_came(
    connection: tuple[Association, ReceiverSocket, socket.socket],
) -> None:
    _, sock, peer = connection
    peer.sendall(b"x" * 100)
    peer.close()
    assert sock.recv(1000) == bytearray(b"x" * 100)


def test_a_pdu_longer_than_we_accept_is_refused_before_it_is_read(
    connection: tuple[Association, ReceiverSocket, socket.socket],
) -> None:
    _, sock, _ = connection
    with pytest.raises(OSError, match="longer than"):
        sock.recv(MIN_PDU_LIMIT + 1)


def test_the_reactor_sees_incoming_data_and_wakes_for_a_queued_reply(
    connection: tuple[Association, ReceiverSocket, socket.socket],
) -> None:
    assoc, sock, peer = connection
    assert sock.ready is False  # nothing came within the wait
    assoc.dul.to_provider_queue.put("a reply")
    assert sock.ready is False  # woken, but nothing to read: the reactor goes to its queue
    assert assoc.dul.to_provider_queue.get(False) == "a reply"
    peer.sendall(b"\x07")
    assert sock.ready is True


def test_ending_the_connection_closes_the_wake_up_sockets(
    connection: tuple[Association, ReceiverSocket, socket.socket],
) -> None:
    assoc, sock, _ = connection
    sock._shutdown_socket()
    assert sock.woken_by.fileno() == sock.wake.fileno() == -1
    assoc.dul.to_provider_queue.put("late reply")  # no error: nothing waits any more


def test_associations_leave_no_open_descriptors_behind() -> None:
    """Associations through the real server end without waiting for a garbage collection."""
    ae = AE(ae_title="PROMPT")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax)
    ae.add_supported_context(Verification)
    server = start_server(ae, ("127.0.0.1", 0), [(evt.EVT_C_ECHO, lambda event: 0x0000)])
    try:
        scu = AE(ae_title="SCU")
        scu.add_requested_context(Verification)
        scu.add_requested_context(CTImageStorage)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(10):
            assoc = scu.associate("127.0.0.1", server.port, ae_title="PROMPT")
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
        deadline = time.monotonic() + 5.0  # the acceptors end a moment after the release
        while len(os.listdir("/proc/self/fd")) > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(os.listdir("/proc/self/fd")) <= before
    finally:
        server.shutdown()


def test_this_pynetdicom_has_every_internal_the_patch_relies_on() -> None:
    assert missing_internals(Association(AE(), MODE_ACCEPTOR)) == []
    check_pynetdicom()


def test_a_renamed_internal_is_named_before_any_association_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a pynetdicom release renaming `_run_loop_delay` would do: refuse to start."""
    real_init = dul.DULServiceProvider.__init__

    def renamed(self: dul.DULServiceProvider, assoc: Association) -> None:
        real_init(self, assoc)
        self._loop_delay = self.__dict__.pop("_run_loop_delay")

    monkeypatch.setattr(dul.DULServiceProvider, "__init__", renamed)
    with pytest.raises(RuntimeError, match="DULServiceProvider._run_loop_delay"):
        check_pynetdicom()
    with pytest.raises(RuntimeError, match="_run_loop_delay"):
        start_server(AE(), ("127.0.0.1", 0), [])


@pytest.mark.parametrize("name", DUL_ATTRIBUTES)
def test_the_reactor_still_reads_what_the_patch_sets(name: str) -> None:
    """An attribute that exists but that pynetdicom stopped reading would be set for nothing."""
    assert f"self.{name}" in inspect.getsource(dul.DULServiceProvider)


@pytest.mark.parametrize("name", SOCKET_METHODS)
def test_pynetdicom_still_calls_the_socket_methods_the_patch_overrides(name: str) -> None:
    callers = inspect.getsource(dul.DULServiceProvider) + inspect.getsource(transport)
    assert f".{name}" in callers.replace(f"def {name}", "")
