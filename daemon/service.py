"""`pacs-ai serve`: wires receiver, assembler, reaper and worker pool; speaks to systemd."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from types import FrameType
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from daemon.assemble import Assembler
from daemon.config import Settings
from daemon.db import migrate, queue
from daemon.db.engine import DatabaseMissing, DatabaseNotAtHead, make_engine
from daemon.db.schema import Job, JobState
from daemon.http import HttpService, HttpStartError
from daemon.http.console import console_url
from daemon.logsetup import kv
from daemon.metrics import (
    Metrics,
    QueueCollector,
    cleanup_multiprocess,
    enable_multiprocess,
    metrics_registry,
    serve_metrics,
)
from daemon.ports import Listen, PortUnavailable, binding, probe
from daemon.receive import Receiver, warn_if_open
from daemon.retention import schedule as schedule_retention
from daemon.sdnotify import Notifier, watchdog_interval
from daemon.spool import Spool
from daemon.worker import WorkerPool

log = logging.getLogger(__name__)

REAP_SECONDS = 15.0
MODEL_LOAD_TIMEOUT = 600.0


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StartupError(Exception):
    """The service cannot start; the message names the cause for one log line."""


class StartupInterrupted(BaseException):
    """SIGTERM or SIGINT while starting: raised where the main thread is, to unwind start-up.

    A BaseException, like KeyboardInterrupt, so no `except Exception` on the way swallows it.
    """


class _Signals:
    """While starting, the first SIGTERM/SIGINT interrupts start-up; once serving, the first
    drains and a second stops at once."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.at_once = threading.Event()
        self.starting = True

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stop.is_set():
            self.at_once.set()
        first = not self.stop.is_set()
        self.stop.set()
        if first and self.starting:
            raise StartupInterrupted(signal.Signals(signum).name)


def check_database(engine: Engine) -> None:
    """Refuse to serve on a database that is missing, unreachable or not at this code's schema."""
    try:
        migrate.require_head(engine)
    except SQLAlchemyError as exc:
        raise StartupError(f"database unreachable: {str(exc.orig or exc).strip()}") from exc
    except (DatabaseMissing, DatabaseNotAtHead) as exc:
        raise StartupError(f"{exc}: run `pacs-ai db upgrade`") from exc


class Service:
    """The running daemon's parts, so health checks and shutdown can reach each one."""

    def __init__(self, settings: Settings, log_level: str = "info") -> None:
        self.settings = settings
        self.notifier = Notifier()
        self.engine = make_engine(settings.storage.effective_database_url, create=False)
        self.spool = Spool(settings.storage.spool_dir)
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.assembler = Assembler(self.engine, settings, self.scheduler)
        self.metrics = Metrics()
        self.pool = WorkerPool(settings, log_level)
        self.receiver = Receiver(
            settings, self.engine, on_stored=self.assembler.arrived, metrics=self.metrics
        )
        self._scheduler_tick = time.monotonic()
        self._serving = threading.Event()
        self.http = (
            HttpService(
                settings,
                self.engine,
                self.spool,
                self.assembler.arrived,
                health=self.health,
                ready=self._serving.is_set,
                metrics=self.metrics,
            )
            if settings.http.port
            else None
        )
        self._metrics_server: Any = None

    def listens(self) -> list[Listen]:
        """Every address this service will listen on, named by its setting."""
        dicom, metrics, http = self.settings.dicom, self.settings.metrics, self.settings.http
        listens = [Listen("dicom.port", dicom.bind, dicom.port)]
        if metrics.port:
            listens.append(Listen("metrics.port", metrics.bind, metrics.port))
        if http.port:
            listens.append(Listen("http.port", http.bind, http.port))
        return listens

    def start(self) -> None:
        """Bring every part up; READY=1 only once all of them are.

        The ports are tried first, so a taken one stops the start within a second, before
        any worker loads a model.
        """
        listens = {listen.setting: listen for listen in self.listens()}
        probe(listens.values())
        check_database(self.engine)
        try:
            self.spool.prepare()
        except OSError as exc:
            raise StartupError(f"spool directory {self.spool.root}: {exc.strerror or exc}") from exc
        warn_if_open(self.settings)
        orphans = queue.expire_leases_of_dead_owners(self.engine, socket.gethostname(), _pid_alive)
        if orphans:
            log.warning("jobs of processes that died returned to the queue", extra=kv(jobs=orphans))
        self.scheduler.add_job(
            self._reap, "interval", seconds=REAP_SECONDS, id="reaper", coalesce=True
        )
        self.scheduler.add_job(self._tick, "interval", seconds=1.0, id="tick", coalesce=True)
        schedule_retention(self.scheduler, self.engine, self.spool, self.settings)
        self.pool.start()
        self.scheduler.start()
        if not self.pool.wait_ready(MODEL_LOAD_TIMEOUT):
            raise StartupError(
                f"workers could not load the models in {self.settings.models.dir} "
                "(the worker's log line names the file and field)"
            )
        with binding(listens["dicom.port"]):
            try:
                self.receiver.start()
            except RuntimeError as exc:  # a receiver process that died starting
                raise StartupError(str(exc)) from exc
        registry = self._start_metrics(listens.get("metrics.port"))
        if self.http is not None:
            with binding(listens["http.port"]):
                try:
                    self.http.start(registry)
                except HttpStartError as exc:
                    raise StartupError(str(exc)) from exc
            url = console_url(self.settings.http, self.http.port)
            log.info("operator console", extra=kv(url=url))
        self._echo_destinations()
        log.info(
            "serving",
            extra=kv(
                ae=self.settings.dicom.ae_title,
                port=self.receiver.port,
                http=self.http.port if self.http is not None else "off",
                workers=self.settings.workers.count,
            ),
        )
        self._serving.set()
        self.notifier.ready(self.status_line())

    def _start_metrics(self, listen: Listen | None) -> object:
        """The registry /metrics exposes; served on `[metrics]` too unless its port is 0."""

        def counts() -> dict[str, dict[str, int]]:
            with self.engine.connect() as conn:
                return queue.counts_by_kind_and_state(conn)

        def oldest() -> float | None:
            with self.engine.connect() as conn:
                return queue.oldest_queued_age(conn)

        registry = metrics_registry(
            QueueCollector(counts, oldest, self.spool.free_bytes), self.metrics
        )
        if listen is not None:
            with binding(listen):
                self._metrics_server = serve_metrics(listen.bind, listen.port, registry)
            log.info("metrics served", extra=kv(port=listen.port))
        return registry

    def _reap(self) -> None:
        reaped = queue.reap_expired(self.engine)
        if reaped:
            log.warning("expired leases returned to the queue", extra=kv(jobs=reaped))

    def _tick(self) -> None:
        self._scheduler_tick = time.monotonic()

    def _echo_destinations(self) -> None:
        """Probe each destination once at start (recorded, as the console shows it); while
        the HTTP server runs, again every PROBE_SECONDS."""
        from daemon.dispatch import probes

        for dest in self.settings.destinations:
            outcome = probes.probe(self.engine, self.settings, dest)
            if outcome.ok:
                log.info("destination answers", extra=kv(destination=dest.name, echo=str(outcome)))
            else:
                log.warning(
                    "destination does not answer; reports will wait and retry",
                    extra=kv(destination=dest.name, echo=str(outcome)),
                )
        if self.http is not None and self.settings.destinations:
            self.scheduler.add_job(
                probes.probe_all,
                "interval",
                args=[self.engine, self.settings],
                seconds=probes.PROBE_SECONDS,
                id="probe-destinations",
                coalesce=True,
                max_instances=1,
            )

    def health(self) -> list[str]:
        """What is wrong right now; empty when the watchdog may be petted."""
        faults = []
        if not self.receiver.alive():
            faults.append("receiver not running")
        if self.http is not None and not self.http.alive():
            faults.append("http server not running")
        if not self.scheduler.running or time.monotonic() - self._scheduler_tick > 10:
            faults.append("scheduler stalled")
        try:
            # The service's own table, not `SELECT 1`: a server that answers while the
            # schema is gone (dropped, renamed, wrong search_path) cannot run the queue.
            with self.engine.connect() as conn:
                conn.execute(select(Job.id).limit(1))
        except SQLAlchemyError as exc:
            faults.append(f"database: {str(exc.orig or exc).strip().splitlines()[0]}")
        return faults

    def status_line(self) -> str:
        """The STATUS= text systemctl shows: the queue at a glance."""
        try:
            with self.engine.connect() as conn:
                counts = queue.counts_by_kind_and_state(conn)
        except SQLAlchemyError:
            return "database unreachable"
        queued = sum(s.get(JobState.QUEUED, 0) for s in counts.values())
        running = sum(s.get(JobState.RUNNING, 0) for s in counts.values())
        dead = sum(s.get(JobState.DEAD, 0) for s in counts.values())
        return f"serving; jobs queued {queued}, running {running}, dead {dead}"

    def run_until_stopped(self, signals: _Signals) -> None:
        """The health loop: pets the watchdog only while every part is healthy."""
        interval = watchdog_interval() or 5.0
        while not signals.stop.wait(interval):
            faults = self.health()
            if faults:
                log.error("unhealthy; not petting the watchdog", extra=kv(faults="; ".join(faults)))
                self.notifier.status("unhealthy: " + "; ".join(faults))
                continue
            self.notifier.watchdog()
            self.notifier.status(self.status_line())

    def stop(self, signals: _Signals) -> None:
        """Drain: refuse new associations, finish in-flight ones and jobs, then exit."""
        drain = 0.0 if signals.at_once.is_set() else self.settings.dicom.drain_seconds
        self._serving.clear()
        self.notifier.stopping()
        log.info("stopping", extra=kv(drain_seconds=drain))
        self.receiver.stop_accepting()
        stopper = threading.Thread(target=self._stop_parts, args=(drain, signals), daemon=True)
        stopper.start()
        while stopper.is_alive():
            if signals.at_once.wait(0.2):
                log.warning("second signal: stopping at once")
                if self.http is not None:
                    self.http.stop(0.0)
                self.receiver.stop(0.0)
                self.pool.stop(0.0, at_once=True)
                break
        stopper.join(10.0)
        self.scheduler.shutdown(wait=False)
        self.engine.dispose()
        log.info("stopped")

    def _stop_parts(self, drain: float, signals: _Signals) -> None:
        started = time.monotonic()
        if self.http is not None:
            self.http.stop(drain)
        self.receiver.stop(max(0.0, drain - (time.monotonic() - started)))
        self.pool.stop(0.0 if signals.at_once.is_set() else drain)
        self._stop_metrics()

    def _stop_metrics(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()

    def abandon_start(self) -> None:
        """Undo a start that failed or was interrupted: no worker, thread or port is left.

        Worker processes are not daemonic (they must finish a job on a warm stop), so one
        left running would also keep this process from exiting.
        """
        self.pool.stop(0.0, at_once=True)
        if self.http is not None:
            self.http.stop(0.0)
        if self.receiver.alive():
            self.receiver.stop(0.0)
        self._stop_metrics()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        self.engine.dispose()


def serve(settings: Settings, log_level: str = "info") -> int:
    """Run until SIGTERM; 0 on a clean stop (one during start-up too), 1 when it cannot start."""
    signals = _Signals()
    signals.install()
    metrics_dir = enable_multiprocess()
    try:
        service = _start(settings, log_level, signals)
        if service is None:
            return 0
        service.run_until_stopped(signals)
        service.stop(signals)
        return 0
    except (StartupError, PortUnavailable) as exc:
        log.error("cannot start", extra=kv(reason=str(exc)))
        return 1
    finally:
        cleanup_multiprocess(metrics_dir)


def _start(settings: Settings, log_level: str, signals: _Signals) -> Service | None:
    """The started service, or None when a signal stopped the start; whatever the start
    had begun (workers, threads, ports) is undone before an error leaves here."""
    service: Service | None = None
    try:
        service = Service(settings, log_level)
        service.start()
        signals.starting = False
        return service
    except StartupInterrupted as exc:
        signals.starting = False
        log.info("stopped while starting", extra=kv(signal=str(exc)))
        if service is not None:
            service.abandon_start()
        return None
    except BaseException:
        signals.starting = False
        if service is not None:
            service.abandon_start()
        raise
