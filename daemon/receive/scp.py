"""The DICOM receiver: a pynetdicom Storage SCP that answers only after a durable commit.

`Receiver` is what the service runs. With ``[dicom] processes = 1`` it serves from threads
in the calling process; with more, it starts that many `spawn`ed processes that each listen
on the same port (``SO_REUSEPORT``, the kernel spreads connections) so parallel senders use
every core, and forwards their ``on_stored`` events to the parent through a queue.

pynetdicom keeps its options in module globals: `configure_pynetdicom` sets them, and the
service (or `Receiver.start`, which calls it) must run it before serving.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Callable
from multiprocessing.sharedctypes import SynchronizedArray
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
from sqlalchemy import Engine

from daemon.config import Settings
from daemon.db.engine import make_engine
from daemon.dicom import status
from daemon.dicom.commitment import add_commitment_context
from daemon.dicom.network import (
    POLL_SECONDS,
    UNCOMPRESSED,
    AssociationOptions,
    RunningServer,
    server_tls_context,
    start_server,
)
from daemon.lifeline import watch_parent
from daemon.logsetup import kv, setup_logging
from daemon.metrics import Metrics
from daemon.receive.commitment import handle_commitment_report
from daemon.receive.commitment_scp import CommitmentScp
from daemon.receive.ingest import Ingestor, Outcome, Request
from daemon.receive.mpps import MPPS_SOP_CLASS, MppsScp
from daemon.spool import Spool

log = logging.getLogger(__name__)

# Accepted as sent and stored as sent: the receiver never decodes pixel data.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (Process 14 SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
]
START_TIMEOUT = 60.0


def configure_pynetdicom(*, unrestricted: bool = True, chunked: bool = False) -> None:
    """Set pynetdicom's process-global options; call once per process before serving.

    - ``UNRESTRICTED_STORAGE_SERVICE``: accept every storage SOP class, private and
      unknown ones included, in the transfer syntax the sender prefers (stored as sent).
    - ``STORE_RECV_CHUNKED_DATASET``: off by default; received instances of CT/MR size are
      faster from memory (on means a pynetdicom temporary file per instance).
    - ``LOG_REQUEST_IDENTIFIERS`` / ``LOG_RESPONSE_IDENTIFIERS`` off: they log patient data.
    - ``LOG_HANDLER_LEVEL = "none"``: no per-PDU debug handlers on the hot path.
    """
    _config.UNRESTRICTED_STORAGE_SERVICE = unrestricted
    _config.STORE_RECV_CHUNKED_DATASET = chunked
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"


def add_receiver_contexts(ae: AE) -> None:
    """What the receiver accepts (the README's conformance table is generated from this):
    Verification and every storage SOP class pynetdicom names in `TRANSFER_SYNTAXES` (with
    `UNRESTRICTED_STORAGE_SERVICE`, any other storage class too), Storage Commitment (both
    roles) and Modality Performed Procedure Step."""
    ae.add_supported_context(Verification, TRANSFER_SYNTAXES)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
    add_commitment_context(ae)
    ae.add_supported_context(MPPS_SOP_CLASS, list(UNCOMPRESSED))


def warn_if_open(settings: Settings, logger: logging.Logger = log) -> bool:
    """Log a warning when any calling AE title is accepted; True if it warned."""
    if settings.dicom.allowed_callers:
        return False
    logger.warning(
        "dicom.allowed_callers is empty: any calling AE title may store",
        extra=kv(ae_title=settings.dicom.ae_title, port=settings.dicom.port),
    )
    return True


class _LimitedAE(AE):
    """An AE whose association limit counts sibling processes and drops to 0 when draining.

    pynetdicom's ACSE rejects an association (transient, local limit exceeded) when this
    process holds more acceptors than `maximum_associations`; this property subtracts what
    the siblings published, and answers 0 once `draining` is set.
    """

    def __init__(self, ae_title: str, limit: int, counts: Any = None, index: int = 0) -> None:
        super().__init__(ae_title=ae_title)
        self.limit = limit
        self.draining = False
        self._counts = counts
        self._index = index

    @property  # type: ignore[override]
    def maximum_associations(self) -> int:
        if self.draining:
            return 0
        if self._counts is None:
            return self.limit
        self.publish_count()
        others = sum(c for i, c in enumerate(self._counts) if i != self._index)
        return self.limit - others

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        self.limit = value

    def acceptors(self) -> list[Association]:
        return [a for a in self.active_associations if a.is_acceptor]

    def publish_count(self) -> None:
        """Tell the sibling processes how many associations this one holds."""
        if self._counts is not None:
            self._counts[self._index] = len(self.acceptors())


def _peer(assoc: Association) -> str:
    return f"{assoc.requestor.address}:{assoc.requestor.port}"


class _DuplicateTally:
    """Per association: C-STOREs answered and how many were duplicates of stored instances.

    A sender that sends a study again gets success for every instance and nothing else
    happens (nothing new to analyse); the end of such an association says so once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}  # peer -> [answered, duplicates]

    def answered(self, peer: str) -> None:
        with self._lock:
            self._counts.setdefault(peer, [0, 0])[0] += 1

    def outcome(self, req: Request, outcome: Outcome) -> None:
        if outcome is Outcome.DUPLICATE:
            with self._lock:
                self._counts.setdefault(req.peer, [0, 0])[1] += 1

    def ended(self, assoc: Association) -> None:
        """Log one INFO line if every instance of the association was a duplicate."""
        with self._lock:
            answered, duplicates = self._counts.pop(_peer(assoc), [0, 0])
        if answered and duplicates == answered:
            log.info(
                "association sent only instances already stored (identical): nothing new",
                extra=kv(
                    peer=_peer(assoc), calling_ae=assoc.requestor.ae_title, instances=answered
                ),
            )


class _Listener:
    """One process's SCP: an AE, its server thread and the event handlers."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        on_stored: Callable[[str], None] | None,
        *,
        reuse_port: bool = False,
        counts: Any = None,
        index: int = 0,
        spool: Spool | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        dicom = settings.dicom
        self.settings = settings
        self.metrics = metrics
        self.spool = spool or Spool(settings.storage.spool_dir)
        self.spool.prepare()
        self.duplicates = _DuplicateTally()
        self.ingestor = Ingestor(
            self.spool,
            engine,
            settings.storage.min_free_mb * 2**20,
            on_stored,
            on_outcome=self.duplicates.outcome,
        )
        ae = _LimitedAE(dicom.ae_title, dicom.max_associations, counts, index)
        ae.require_called_aet = True
        ae.require_calling_aet = settings.accepted_callers
        AssociationOptions.from_settings(dicom).apply(ae)
        add_receiver_contexts(ae)
        self.ae = ae
        # The modality services: its MPPS steps, its storage commitment requests.
        self.commitments = CommitmentScp(settings, engine)
        mpps = MppsScp(engine, on_stored)
        handlers = [
            (
                evt.EVT_N_EVENT_REPORT,
                handle_commitment_report,
                [engine, settings.retry.max_attempts],
            ),
            (evt.EVT_N_ACTION, self.commitments.on_action),
            (evt.EVT_N_CREATE, mpps.on_create),
            (evt.EVT_N_SET, mpps.on_set),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_RELEASED, self._ended),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        self.ssl_context = server_tls_context(dicom.tls)
        self._handlers = handlers
        self._reuse_port = reuse_port
        self.server: RunningServer | None = None
        self._stopped = False
        self._stop_lock = threading.Lock()
        self._deadline = float("inf")
        # Associations counted in the active gauge; each leaves it once, however it ends.
        self._counted: set[int] = set()
        self._counted_lock = threading.Lock()

    def start(self) -> None:
        """Bind the port and serve from a thread."""
        dicom = self.settings.dicom
        self.server = start_server(
            self.ae,
            (dicom.bind, dicom.port),
            self._handlers,
            ssl_context=self.ssl_context,
            reuse_port=self._reuse_port,
        )

    @property
    def port(self) -> int:
        """The port it listens on, once started."""
        if self.server is None:
            raise RuntimeError("listener not started")
        return self.server.port

    def alive(self) -> bool:
        return self.server is not None and self.server.thread.is_alive() and not self._stopped

    def in_flight(self) -> int:
        """Established associations; a rejected one waiting for its peer to hang up is not."""
        return sum(1 for a in self.ae.acceptors() if a.is_established)

    def stop_accepting(self) -> None:
        self.ae.draining = True

    def stop(self, drain_seconds: float) -> None:
        """Reject new associations, let running ones finish, abort the rest, close.

        Safe to call again from another thread: a later call with a shorter drain cuts the
        running one short (a second SIGTERM), and only one call closes the server.
        """
        self.stop_accepting()
        self._deadline = min(self._deadline, time.monotonic() + drain_seconds)
        with self._stop_lock:
            if self._stopped:
                return
            while self.in_flight() and time.monotonic() < self._deadline:
                time.sleep(0.05)
            for assoc in self.ae.acceptors():
                log.warning(
                    "aborting association at shutdown",
                    extra=kv(peer=_peer(assoc), calling_ae=assoc.requestor.ae_title),
                )
                assoc.abort()
            self._stopped = True
            if self.server is not None:
                self.server.shutdown()
            self.ingestor.close()
            self.commitments.close()

    # Event handlers ---------------------------------------------------------------------

    def _on_echo(self, event: Event) -> int:
        return status.SUCCESS

    def _on_store(self, event: Event) -> Any:
        req = event.request
        assoc = event.assoc
        data = event.encoded_dataset()
        self.duplicates.answered(_peer(assoc))
        answer = self.ingestor.store(
            Request(
                data=data,
                sop_class_uid=str(req.AffectedSOPClassUID),
                sop_instance_uid=str(req.AffectedSOPInstanceUID),
                transfer_syntax_uid=str(event.context.transfer_syntax),
                calling_ae=assoc.requestor.ae_title,
                peer=_peer(assoc),
            )
        )
        if self.metrics is not None:
            code = int(answer.Status)
            self.metrics.instances_received.labels(assoc.requestor.ae_title, f"0x{code:04X}").inc()
            if code == status.SUCCESS:
                self.metrics.bytes_received.inc(len(data))
        return answer

    def _on_rejected(self, event: Event) -> None:
        assoc = event.assoc
        rj = assoc.acceptor.primitive
        key = (rj.result, rj.result_source, rj.diagnostic)
        reason = status.rejection_reason(rj.result_source, rj.diagnostic)
        if self.ae.draining and key == status.REJECT_LOCAL_LIMIT:
            reason = "draining for shutdown"
        if self.metrics is not None:
            self.metrics.associations_rejected.labels(reason).inc()
        rq = assoc.requestor.primitive
        log.warning(
            "association rejected",
            extra=kv(
                reason=reason,
                peer=_peer(assoc),
                calling_ae=rq.calling_ae_title,
                called_ae=rq.called_ae_title,
                transient=rj.result == status.REJECTED_TRANSIENT,
            ),
        )

    def _on_established(self, event: Event) -> None:
        assoc = event.assoc
        if self.metrics is not None:
            with self._counted_lock:
                self._counted.add(id(assoc))
            self.metrics.associations_active.inc()
        log.info(
            "association established",
            extra=kv(peer=_peer(assoc), calling_ae=assoc.requestor.ae_title),
        )

    def _ended(self, event: Event) -> None:
        """Close an association's books once, by release, abort or lost connection: its
        duplicates line, and the active gauge.

        pynetdicom marks an association no longer established before it tells of the abort,
        so the gauge cannot ask the association whether it was counted.
        """
        self.duplicates.ended(event.assoc)
        if self.metrics is None:
            return
        with self._counted_lock:
            if id(event.assoc) not in self._counted:
                return
            self._counted.discard(id(event.assoc))
        self.metrics.associations_active.dec()

    def _on_aborted(self, event: Event) -> None:
        self._ended(event)
        assoc = event.assoc
        log.warning(
            "association aborted",
            extra=kv(peer=_peer(assoc), calling_ae=assoc.requestor.ae_title),
        )

    def _on_conn_close(self, event: Event) -> None:
        self._ended(event)
        self.ae.publish_count()

    def _on_conn_open(self, event: Event) -> None:
        self.ae.publish_count()


def _child_main(
    settings: Settings,
    database_url: str,
    index: int,
    counts: SynchronizedArray[Any],
    events: Any,
    ready: Any,
    draining: Any,
    stopping: Any,
    drain: Any,
    log_level: str,
) -> None:
    """A spawned receiver process: serve until the parent says stop (or is gone), then drain."""
    setup_logging(log_level)
    watch_parent(lambda: setattr(stopping, "value", 1))
    configure_pynetdicom()
    engine = make_engine(database_url)
    listener = _Listener(
        settings,
        engine,
        events.put,
        reuse_port=True,
        counts=counts,
        index=index,
        metrics=Metrics(),
    )
    listener.start()
    ready.value = 1
    # Plain shared flags, polled: a process killed while waiting on an mp.Event would make the
    # other's set() wait for it forever (a parent killed while waiting for `ready` did).
    while not stopping.value:
        if draining.value:
            listener.stop_accepting()
        listener.ae.publish_count()
        time.sleep(POLL_SECONDS)
    listener.stop_accepting()
    started = time.monotonic()
    while listener.in_flight() and time.monotonic() - started < drain.value:
        time.sleep(0.05)  # the parent may shorten `drain` meanwhile (a second SIGTERM)
    listener.stop(0.0)
    counts[index] = 0
    events.put(None)
    engine.dispose()


class Receiver:
    """The DICOM SCP the service runs: Verification and Storage, answering after commit.

    Parameters
    ----------
    settings
        `[dicom]` (AE title, bind, port, callers, limits, timeouts, PDU, processes, TLS)
        and `[storage]` (spool, min_free_mb).
    engine
        The database (at head). With ``processes > 1`` each process opens its own engine
        on the same URL.
    on_stored
        Called with the Study Instance UID after each committed instance, from a receiver
        thread (never concurrently with itself when ``processes > 1``).
    spool
        The spool to write to (single-process only); tests inject one whose free-space
        probe they control. Default: ``Spool(settings.storage.spool_dir)``.
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        on_stored: Callable[[str], None] | None = None,
        *,
        spool: Spool | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if spool is not None and settings.dicom.processes > 1:
            raise ValueError("an injected spool needs [dicom] processes = 1")
        self.spool = spool
        self.settings = settings
        self.engine = engine
        self.on_stored = on_stored
        self.metrics = metrics
        self._listener: _Listener | None = None
        self._procs: list[Any] = []
        self._ctx = mp.get_context("spawn")
        self._draining = self._ctx.Value("b", 0, lock=False)
        self._stopping = self._ctx.Value("b", 0, lock=False)
        self._drain = self._ctx.Value("d", settings.dicom.drain_seconds)
        self._events: Any = None
        self._forwarder: threading.Thread | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The TCP port the SCP listens on."""
        if self._port is None:
            raise RuntimeError("receiver not started")
        return self._port

    def start(self) -> None:
        """Bind and serve; returns once the port accepts associations."""
        configure_pynetdicom()
        n = self.settings.dicom.processes
        if n == 1:
            self._listener = _Listener(
                self.settings, self.engine, self.on_stored, spool=self.spool, metrics=self.metrics
            )
            self._listener.start()
            self._port = self._listener.port
        else:
            self._start_processes(n)
        log.info(
            "dicom receiver listening",
            extra=kv(
                ae_title=self.settings.dicom.ae_title,
                bind=self.settings.dicom.bind,
                port=self._port,
                processes=n,
            ),
        )

    def _start_processes(self, n: int) -> None:
        Spool(self.settings.storage.spool_dir).prepare()
        counts = self._ctx.Array("i", n, lock=False)
        self._events = self._ctx.Queue()
        url = self.engine.url.render_as_string(hide_password=False)
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
        readies = []
        for index in range(n):
            ready = self._ctx.Value("b", 0, lock=False)
            proc = self._ctx.Process(
                target=_child_main,
                args=(
                    self.settings,
                    url,
                    index,
                    counts,
                    self._events,
                    ready,
                    self._draining,
                    self._stopping,
                    self._drain,
                    level,
                ),
                name=f"pacs-ai-receive-{index}",
                daemon=True,
            )
            proc.start()
            self._procs.append(proc)
            readies.append(ready)
        self._forwarder = threading.Thread(
            target=self._forward, args=(n,), name="receive-events", daemon=True
        )
        self._forwarder.start()
        deadline = time.monotonic() + START_TIMEOUT
        for proc, ready in zip(self._procs, readies, strict=True):
            while not ready.value:
                time.sleep(0.05)
                if not proc.is_alive() or time.monotonic() > deadline:
                    self._stopping.value = 1
                    self._join(5.0)
                    raise RuntimeError(
                        f"receiver process {proc.name} did not start (exit code {proc.exitcode})"
                    )
        self._port = self.settings.dicom.port

    def _forward(self, n: int) -> None:
        """Hand the children's stored-study events to `on_stored`, until all have ended."""
        ended = 0
        while ended < n:
            try:
                study_uid = self._events.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in self._procs):
                    return
                continue
            if study_uid is None:
                ended += 1
            elif self.on_stored is not None:
                self.on_stored(study_uid)

    def stop_accepting(self) -> None:
        """From now on reject new associations transiently (local limit exceeded).

        Immediate with one process; sibling processes see it within `POLL_SECONDS`.
        """
        self._draining.value = 1
        if self._listener is not None:
            self._listener.stop_accepting()

    def stop(self, drain_seconds: float | None = None) -> None:
        """Stop accepting, wait up to `drain_seconds` for running associations, abort the rest."""
        drain = self.settings.dicom.drain_seconds if drain_seconds is None else drain_seconds
        self.stop_accepting()
        if self._listener is not None:
            self._listener.stop(drain)
        if self._procs:
            self._drain.value = min(self._drain.value, drain)
            self._stopping.value = 1
            self._join(drain + 10.0)
        log.info("dicom receiver stopped", extra=kv(port=self._port))

    def _join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("receiver process did not stop; killing it", extra=kv(pid=proc.pid))
                proc.kill()
                proc.join(5.0)
        if self._forwarder is not None:
            self._forwarder.join(timeout=5.0)

    def alive(self) -> bool:
        """Whether every SCP thread or process is serving (for the service's watchdog)."""
        if self._listener is not None:
            return self._listener.alive()
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def in_flight(self) -> int:
        """Associations running in this process (single-process mode; 0 otherwise)."""
        return self._listener.in_flight() if self._listener is not None else 0
