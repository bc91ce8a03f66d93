"""Worker processes: claim a job with a lease, heartbeat while it runs, record how it ended."""

from __future__ import annotations

import datetime as dt
import functools
import gc
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as MpEvent
from types import FrameType
from typing import Any

from sqlalchemy.exc import OperationalError

from daemon.config import Settings
from daemon.context import JobHandler, WorkerContext
from daemon.db import migrate, queue
from daemon.db.engine import make_engine
from daemon.db.keys import ANALYSE, COMMITMENT_REPORT, DISPATCH, EMBED, REPORT, VERIFY
from daemon.db.schema import JobState
from daemon.lifeline import watch_parent
from daemon.logsetup import kv, setup_logging
from daemon.metrics import Metrics
from daemon.spool import Spool

log = logging.getLogger(__name__)

EXIT_BAD_MODELS = 2
# Work only a cache depends on (the CNNs on a study still arriving): claimed when nothing
# else is due, so a closed study's analysis, report or delivery never waits behind other
# studies' early passes (the analysis does whatever an early pass did not).
SPECULATIVE = frozenset({EMBED})


class ColdShutdown(BaseException):
    """Raised in the worker's main thread by a second SIGTERM: give the job back now."""


def load_handlers() -> dict[str, JobHandler]:
    """The job kinds and their handlers; imported late so the parent never loads TensorFlow."""
    from daemon.analyse import run_analyse, run_embed
    from daemon.dispatch.job import dispatch_id_of, mark_dead, run_dispatch
    from daemon.dispatch.verify import run_verify
    from daemon.receive.commitment_scp import report_failed, run_commitment_report
    from daemon.report.job import prebuild_report, run_report

    def embed(ctx: WorkerContext, job: queue.ClaimedJob) -> None:
        run_embed(ctx, job, functools.partial(prebuild_report, ctx))

    def analysed(ctx: WorkerContext, job: queue.ClaimedJob, seconds: float) -> None:
        if ctx.metrics is not None:
            ctx.metrics.analysis_seconds.observe(seconds)

    def dispatch(ctx: WorkerContext, job: queue.ClaimedJob) -> None:
        run_dispatch(ctx.engine, job, ctx.settings)

    def dispatching(ctx: WorkerContext, job: queue.ClaimedJob) -> None:
        if ctx.metrics is not None:
            ctx.metrics.dispatch_attempts.labels(job.payload.get("destination", "")).inc()

    def dispatch_failed(
        ctx: WorkerContext, job: queue.ClaimedJob, state: JobState | None, error: str
    ) -> None:
        if ctx.metrics is not None:
            ctx.metrics.dispatch_failures.labels(job.payload.get("destination", "")).inc()
        if state == JobState.DEAD:
            mark_dead(ctx.engine, dispatch_id_of(job), error)

    def verify(ctx: WorkerContext, job: queue.ClaimedJob) -> None:
        run_verify(ctx.engine, job, ctx.settings)

    return {
        EMBED: JobHandler(embed),
        ANALYSE: JobHandler(run_analyse, finished=analysed),
        REPORT: JobHandler(run_report),
        DISPATCH: JobHandler(dispatch, started=dispatching, failed=dispatch_failed),
        VERIFY: JobHandler(verify),
        COMMITMENT_REPORT: JobHandler(run_commitment_report, failed=report_failed),
    }


def load_registry(settings: Settings) -> Any:
    """The model registry, loaded once per worker."""
    from models.registry import Registry

    return Registry.load(settings.models.dir, settings.models.device)


class _Heartbeat(threading.Thread):
    """Extends the lease while the job runs; notices when the lease was lost."""

    def __init__(self, ctx: WorkerContext, job: queue.ClaimedJob) -> None:
        super().__init__(name=f"heartbeat-{job.id}", daemon=True)
        self._ctx = ctx
        self._job = job
        self._done = threading.Event()
        self.lost = False

    def run(self) -> None:
        lease = self._ctx.settings.workers.lease_seconds
        while not self._done.wait(lease / 3):
            try:
                alive = queue.heartbeat(self._ctx.engine, self._job.id, self._ctx.owner, lease)
            except OperationalError as exc:
                log.warning("heartbeat failed", extra=kv(job=self._job.id, error=str(exc)[:200]))
                continue
            if not alive:
                self.lost = True
                log.warning("lease lost", extra=kv(job=self._job.id))
                return

    def stop(self) -> None:
        self._done.set()
        self.join()


def _claim(ctx: WorkerContext, kinds: list[str]) -> queue.ClaimedJob | None:
    """The oldest due job of `kinds`, speculative kinds only when no other is due."""
    lease = ctx.settings.workers.lease_seconds
    first = [k for k in kinds if k not in SPECULATIVE]
    last = [k for k in kinds if k in SPECULATIVE]
    for tier in (first, last):
        job = queue.claim(ctx.engine, ctx.owner, tier, lease) if tier else None
        if job is not None:
            return job
    return None


def run_one(ctx: WorkerContext, handlers: dict[str, JobHandler]) -> bool:
    """Claim and run one job; False when nothing was due."""
    job = _claim(ctx, list(handlers))
    if job is None:
        return False
    log.info("job started", extra=kv(job=job.id, kind=job.kind, key=job.key, attempt=job.attempts))
    beat = _Heartbeat(ctx, job)
    beat.start()
    started = time.monotonic()
    handler = handlers[job.kind]
    handler.started(ctx, job)
    try:
        handler.run(ctx, job)
    except ColdShutdown:
        beat.stop()
        queue.release(ctx.engine, job.id, ctx.owner)
        log.warning("job released on shutdown", extra=kv(job=job.id))
        raise
    except queue.LeaseLost:
        beat.stop()
        log.warning("job abandoned: lease lost", extra=kv(job=job.id))
        return True
    except Exception as exc:  # noqa: BLE001 - any failure is recorded on the job and retried
        beat.stop()
        _record_failure(ctx, job, handler, exc)
        return True
    beat.stop()
    seconds = time.monotonic() - started
    handler.finished(ctx, job, seconds)
    log.info("job done", extra=kv(job=job.id, kind=job.kind, seconds=round(seconds, 3)))
    return True


def _record_failure(
    ctx: WorkerContext, job: queue.ClaimedJob, handler: JobHandler, exc: Exception
) -> None:
    error = f"{type(exc).__name__}: {exc}"
    # Stages mark failures that no retry can mend with `retryable = False`.
    permanent = getattr(exc, "retryable", True) is False
    state = queue.fail(ctx.engine, job.id, ctx.owner, error, ctx.policy, permanent=permanent)
    # One line per attempt, saying where it was going and when it is tried again.
    fields: dict[str, Any] = {"job": job.id, "kind": job.kind}
    if "destination" in job.payload:
        fields["destination"] = job.payload["destination"]
    fields["attempt"] = f"{job.attempts}/{job.max_attempts}"
    if state == JobState.QUEUED:
        next_try = queue.next_attempt_at(ctx.engine, job.id)
        fields["next_try"] = _utc(next_try) if next_try else "now"
    fields["error"] = error[:300]
    trace = exc if log.isEnabledFor(logging.DEBUG) else None  # `error` says it otherwise
    if state == JobState.DEAD:
        log.error("job failed, giving up", exc_info=trace, extra=kv(**fields))
    elif state == JobState.QUEUED:
        log.warning("job failed, will retry", exc_info=trace, extra=kv(**fields))
    else:
        log.warning("job failed after its lease was lost", exc_info=trace, extra=kv(**fields))
    handler.failed(ctx, job, state, error)


def _utc(moment: dt.datetime) -> str:
    """A timestamp for a log line, in UTC like the line's own time."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def make_context(settings: Settings, name: str) -> WorkerContext:
    """A worker's database, spool and models, loaded once."""
    engine = make_engine(settings.storage.effective_database_url, pool_size=2, create=False)
    ctx = WorkerContext(
        settings=settings,
        engine=engine,
        spool=Spool(settings.storage.spool_dir),
        owner=f"{socket.gethostname()}:{os.getpid()}:{name}",
        registry=load_registry(settings),
        policy=queue.RetryPolicy.from_settings(settings.retry),
        metrics=Metrics(),
    )
    # TensorFlow's hundreds of thousands of objects live as long as the worker: keep the
    # cycle collector off them, or every full collection during an SR build walks them all.
    gc.freeze()
    return ctx


def work_loop(
    ctx: WorkerContext, handlers: dict[str, JobHandler], stopping: threading.Event
) -> None:
    """Run jobs until `stopping` is set; sleep on the queue's waiter when nothing is due."""
    waiter = queue.JobWaiter(ctx.engine, ctx.settings.workers.poll_seconds)
    try:
        while not stopping.is_set():
            try:
                if run_one(ctx, handlers):
                    continue
            except OperationalError as exc:
                log.warning("database unavailable", extra=kv(error=str(exc).splitlines()[0]))
                time.sleep(1.0)
                continue
            waiter.wait(timeout=1.0)
    finally:
        waiter.close()


def _install_signals(stopping: threading.Event) -> None:
    """First SIGTERM: finish the job in hand. Second: give it back now. Any later one is
    ignored, so it cannot interrupt the giving back (the pool may signal more than twice)."""
    cold = threading.Event()

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        if cold.is_set():
            return
        if stopping.is_set():
            cold.set()
            raise ColdShutdown()
        stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _context_or_exit(settings: Settings, name: str) -> WorkerContext:
    """The worker's context; a model folder that cannot load ends the process with one line."""
    from models.manifest import ManifestError

    try:
        return make_context(settings, name)
    except ManifestError as exc:
        log.error("models cannot be loaded", extra=kv(worker=name, error=str(exc)))
        raise SystemExit(EXIT_BAD_MODELS) from exc


def worker_process(settings_data: dict[str, Any], index: int, ready: MpEvent, level: str) -> None:
    """Entry point of a spawned pool worker."""
    setup_logging(level)
    # The parent is told after "worker ready" is logged, so the line precedes READY=1.
    _serve_jobs(Settings(**settings_data), f"w{index}", ready.set, worker=index)


def run_standalone(settings: Settings) -> int:
    """`pacs-ai worker`: the same loop in the foreground, for extra hosts.

    Like serve, it refuses a database that is missing or not at head (one line from the CLI).
    """
    migrate.open_at_head(settings.storage.effective_database_url).dispose()
    _serve_jobs(settings, "standalone", lambda: None)
    return 0


def _serve_jobs(
    settings: Settings, name: str, on_ready: Callable[[], None], **labels: Any
) -> None:
    """Yield the CPU to the receiver, load the models, say so, then run jobs until stopped."""
    os.nice(settings.workers.nice)  # before any thread starts (TensorFlow's): they inherit it
    stopping = threading.Event()
    _install_signals(stopping)
    # A pool worker stops as on SIGTERM once `serve` is gone (even killed); standalone: no-op.
    watch_parent(functools.partial(os.kill, os.getpid(), signal.SIGTERM))
    ctx = _context_or_exit(settings, name)
    handlers = load_handlers()
    log.info("worker ready", extra=kv(**labels, owner=ctx.owner))
    on_ready()
    try:
        work_loop(ctx, handlers, stopping)
    except ColdShutdown:
        log.warning("worker stopped at once", extra=kv(**labels))
    finally:
        ctx.engine.dispose()


class WorkerPool:
    """Spawned worker processes, restarted when they die, drained on shutdown."""

    def __init__(self, settings: Settings, log_level: str) -> None:
        self._settings = settings
        self._level = log_level
        self._ctx = mp.get_context("spawn")
        self._procs: list[BaseProcess | None] = [None] * settings.workers.count
        self._ready: list[MpEvent] = [self._ctx.Event() for _ in range(settings.workers.count)]
        self._stopping = threading.Event()
        self._monitor = threading.Thread(target=self._supervise, name="pool", daemon=True)
        self.restarts = 0

    def start(self) -> None:
        for i in range(len(self._procs)):
            self._spawn(i)
        self._monitor.start()

    def _spawn(self, index: int) -> None:
        self._ready[index].clear()
        proc = self._ctx.Process(
            target=worker_process,
            args=(self._settings.model_dump(mode="json"), index, self._ready[index], self._level),
            name=f"pacs-ai-worker-{index}",
        )
        proc.start()
        self._procs[index] = proc

    def _supervise(self) -> None:
        while not self._stopping.wait(1.0):
            for i, proc in enumerate(self._procs):
                if proc is None or proc.is_alive() or self._stopping.is_set():
                    continue
                if proc.exitcode == EXIT_BAD_MODELS:
                    continue  # restarting cannot help; the worker logged why
                log.error("worker died, restarting", extra=kv(worker=i, code=proc.exitcode))
                self.restarts += 1
                self._spawn(i)

    def wait_ready(self, timeout: float) -> bool:
        """True once every worker has loaded its models; False at once if one gave up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(ev.is_set() for ev in self._ready):
                return True
            if any(p is not None and p.exitcode == EXIT_BAD_MODELS for p in self._procs):
                return False
            time.sleep(0.1)
        return False

    def alive(self) -> bool:
        return all(p is not None and p.is_alive() for p in self._procs)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None and p.pid is not None]

    def stop(self, drain_seconds: float, *, at_once: bool = False) -> None:
        """Warm stop (finish the job) within `drain_seconds`, then cold (release), then kill."""
        self._stopping.set()
        procs = [p for p in self._procs if p is not None and p.is_alive()]
        for p in procs:
            _signal(p, signal.SIGTERM)
        if at_once:
            for p in procs:
                _signal(p, signal.SIGTERM)
        deadline = time.monotonic() + (0 if at_once else drain_seconds)
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                _signal(p, signal.SIGTERM)
                p.join(5.0)
            if p.is_alive():
                p.kill()
                p.join(1.0)


def _signal(proc: BaseProcess, signum: int) -> None:
    if proc.pid is not None:
        try:
            os.kill(proc.pid, signum)
        except ProcessLookupError:
            pass
