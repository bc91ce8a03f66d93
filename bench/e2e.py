"""End-to-end latency: last instance acknowledged to the SR stored in Orthanc, with the
production quiet window, for each way a study is found done, against the pure compiled
CNN+LSTM forward on the same study's ready tensors.

    python -m bench.e2e [--modes mpps,evidence,quiet] [--slices 200] [--size 512]
                        [--repeats 3] [--quiet 30] [--early S] [--evidence S]

The three modes (daemon.assemble decides which rule closes the study):

- ``mpps`` (a): the modality opens an MPPS step before sending and sets it COMPLETED right
  after its last image is acknowledged; the study closes as soon as the N-SET is in.
- ``evidence`` (b): no MPPS; the slices carry InstanceNumber 1..N and even spacing, so the
  study closes `evidence_seconds` (default 2 s) after the last image.
- ``quiet`` (c): neither (the slices carry no InstanceNumber): the quiet window closes it.

Set-up, all on loopback, in one temporary directory:

- models: the seed architecture (CNN 224x224x3, LSTM on its 512-wide embedding) with seeded
  random weights, exactly as `bench.inference` builds them: the cost of the production-sized
  model, with no training (the demo models are smaller and take minutes to train).
- a real Orthanc (`tests.peers.Orthanc`, TCP_NODELAY=1) as the only destination;
- `pacs-ai serve` (`tests.daemon_proc.Daemon`) with SQLite, `quiet_seconds` = --quiet
  (30 s, the production default) and one worker;
- each study: a phantom CT (`models.phantom.write_series`) with fresh study/series UIDs, sent
  by DCMTK `/usr/bin/storescu` (TCP_NODELAY=1); the MPPS messages come from the tests'
  modality simulator (`tests.modality`). The moment storescu exits is "last instance
  acknowledged"; Orthanc's `/tools/find` is then polled every 50 ms for the study's SR.

latency = (SR found) - (storescu exited), nothing subtracted. One warm-up study (the
worker's first, which traces the model graph) is reported apart and not counted. After each
study the pure forward is timed once in this process, so both figures see the same machine
noise; the medians are compared. The daemon's log gives each study's stages ("study queued
for analysis" with its reason, "job started", "series analysed", "report written", "sent",
"job done"). Each mode ends with a line
`RESULT e2e mode=... latency_s=... model_s=... ratio=...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import STORESCU, fields, loadavg, median

TARGET_RATIO = 1.25
POLL_S = 0.05
DAEMON_AET = "PACSAI"
MODALITY_AET = "BENCHSCU"
MODES = {
    "mpps": "(a) MPPS COMPLETED right after the last image",
    "evidence": "(b) evidence only (InstanceNumber 1..N, even spacing)",
    "quiet": "(c) neither (no InstanceNumber, no MPPS): the quiet window",
}
# What the open peers wait after the last image before they start (their documentation).
PEER_WAITS = (
    "mercure 60 s per series; Orthanc StableAge 60 s (default); "
    "MONAI Deploy Informatics Gateway 5 s"
)


# The study and the pure forward -----------------------------------------------------------


def write_study(out: Path, slices: int, size: int, seed: int,
                numbered: bool = True) -> tuple[str, list[Path]]:
    """A phantom CT series with fresh study and series UIDs; (study UID, files). Without
    `numbered` the slices carry no InstanceNumber: no evidence of completeness."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from models.phantom import write_series

    study_uid = generate_uid()
    paths = write_series(out, slices=slices, rows=size, cols=size, lesion=True, seed=seed,
                         study_uid=study_uid, series_uid=generate_uid())
    if not numbered:
        for path in paths:
            ds = dcmread(path)
            del ds.InstanceNumber
            ds.save_as(path, enforce_file_format=True)
    return study_uid, list(paths)


def pure_forward(models_dir: Path, paths: list[Path], batch: int) -> Callable[[], object]:
    """The CNN+LSTM forward on the study's ready tensors, as bench.inference times it."""
    from bench.inference import image_runs
    from models.registry import Registry, SeriesInfo

    (choice,) = Registry.load(models_dir).select(SeriesInfo.from_files(paths))
    _, forward, _ = image_runs(choice, paths, batch, workers=2)
    return forward


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


# The daemon's log --------------------------------------------------------------------------


@dataclasses.dataclass
class LogLine:
    at: float  # epoch seconds
    message: str
    fields: dict[str, str]


_MESSAGES = ("study queued for analysis", "job started", "series analysed", "report written",
             "sent", "job done")


def read_log(text: str) -> list[LogLine]:
    """The daemon log lines this benchmark follows, with their UTC timestamps as epoch seconds."""
    out = []
    for line in text.splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 4 or not parts[0].endswith("Z"):
            continue
        try:
            at = dt.datetime.strptime(parts[0], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
        except ValueError:
            continue
        rest = parts[3]
        for message in _MESSAGES:
            if rest.startswith(message + " ") or rest == message:
                out.append(LogLine(at.timestamp(), message, fields(rest[len(message):])))
                break
    return out


STAGES = (
    ("until the study closed", "ack", "queued"),
    ("queue to analyse start", "queued", "analyse_start"),
    ("inference (series analysed)", "analyse_start", "series_analysed"),
    ("results to DB, analyse done", "series_analysed", "analyse_done"),
    ("to report start", "analyse_done", "report_start"),
    ("report (SR build, write)", "report_start", "report_written"),
    ("to dispatch start", "report_written", "dispatch_start"),
    ("dispatch until SR in Orthanc", "dispatch_start", "found"),
)
# Logged after the SR was already visible in Orthanc (association release, bookkeeping).
AFTER = (
    ("'sent' logged after", "found", "sent"),
    ("dispatch 'job done' after", "found", "dispatch_done"),
)


def study_marks(lines: list[LogLine], study_uid: str) -> dict[str, float]:
    """Timestamps of one study's stages, following its analyse, report and dispatch jobs."""
    marks: dict[str, float] = {}
    jobs: dict[str, str] = {}
    for ln in lines:
        f = ln.fields
        if ln.message == "study queued for analysis" and f.get("study") == study_uid:
            marks.setdefault("queued", ln.at)
            jobs[f.get("job", "")] = "analyse"
        elif ln.message == "job started":
            if f.get("job") in jobs:
                marks.setdefault(f"{jobs[f['job']]}_start", ln.at)
            elif f.get("kind") == "report" and study_uid in f.get("key", ""):
                jobs[f.get("job", "")] = "report"
                marks.setdefault("report_start", ln.at)
            elif f.get("kind") == "dispatch" and "report_written" in marks \
                    and "dispatch_start" not in marks:
                jobs[f.get("job", "")] = "dispatch"
                marks["dispatch_start"] = ln.at
        elif ln.message == "series analysed" and "analyse_start" in marks \
                and "analyse_done" not in marks:
            marks.setdefault("series_analysed", ln.at)
            marks.setdefault("inference_s", float(f.get("seconds", "nan")))
        elif ln.message == "report written" and f.get("study") == study_uid:
            marks.setdefault("report_written", ln.at)
        elif ln.message == "sent" and "dispatch_start" in marks and "dispatch_done" not in marks:
            marks.setdefault("sent", ln.at)
        elif ln.message == "job done" and f.get("job") in jobs:
            marks.setdefault(f"{jobs[f['job']]}_done", ln.at)
    return marks


# One study through the daemon ---------------------------------------------------------------


def send(port: int, files: list[Path]) -> float:
    """storescu every file in one association; the epoch time it exited (all acknowledged)."""
    done = subprocess.run(
        [STORESCU, "-aet", "BENCHSCU", "-aec", DAEMON_AET, "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, text=True, check=False, timeout=600,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    acked = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed ({done.returncode}): {done.stderr[-600:]}")
    return acked


def wait_for_sr(orthanc: Any, study_uid: str, timeout: float) -> float:
    """Poll Orthanc every 50 ms for an SR of the study; the epoch time it was first seen."""
    query = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if orthanc.rest("/tools/find", query):
            return time.time()
        time.sleep(POLL_S)
    raise RuntimeError(f"no SR for study {study_uid} in Orthanc after {timeout} s")


class Mpps:
    """The modality's MPPS step for one study: opened before sending, completed after."""

    def __init__(self, port: int, study_uid: str, files: list[Path]) -> None:
        from pydicom import dcmread
        from pydicom.uid import generate_uid

        from tests.modality import ModalitySimulator, mpps_create_attributes, performed

        self.port = port
        self.step = generate_uid()
        self.modality = ModalitySimulator(MODALITY_AET)
        self.performed = performed([dcmread(p, stop_before_pixels=True) for p in files])
        with self.modality.associate(port, storage=False) as assoc:
            if self.modality.mpps_create(assoc, self.step, mpps_create_attributes(study_uid)):
                raise RuntimeError("MPPS N-CREATE refused")

    def complete(self) -> None:
        from tests.modality import mpps_set_attributes

        with self.modality.associate(self.port, storage=False) as assoc:
            done = mpps_set_attributes("COMPLETED", self.performed)
            if self.modality.mpps_set(assoc, self.step, done):
                raise RuntimeError("MPPS N-SET refused")


def run_study(daemon: Any, orthanc: Any, study_uid: str, files: list[Path], mode: str,
              timeout: float) -> dict[str, float]:
    """Send one study (with its MPPS in mode `mpps`) and wait for its SR; latency and marks."""
    mpps = Mpps(daemon.port, study_uid, files) if mode == "mpps" else None
    acked = send(daemon.port, files)
    if mpps is not None:
        mpps.complete()
    found = wait_for_sr(orthanc, study_uid, timeout)
    time.sleep(0.3)  # let the daemon flush its "job done" line for the dispatch
    marks = study_marks(read_log(daemon.log()), study_uid)
    marks.update(ack=acked, found=found, latency=found - acked)
    return marks


def stage_table(runs: list[dict[str, float]]) -> list[str]:
    """Median seconds of each stage over the runs, with each run's figure."""
    out = []
    for name, start, end in (*STAGES, *AFTER):
        if (name, start, end) == AFTER[0]:
            out.append("  after the SR was found (not part of the latency):")
        values = [r[end] - r[start] for r in runs if start in r and end in r]
        each = " ".join(f"{v:.3f}" for v in values)
        out.append(f"  {name:<30} {median(values):7.3f} s   (runs: {each})")
    return out


# Main ----------------------------------------------------------------------------------------


def daemon_config(work: Path, models_dir: Path, orthanc: Any, quiet: float,
                  early: float | None = None, evidence: float | None = None) -> dict[str, Any]:
    from tests.peers import free_port

    assembly: dict[str, Any] = {"quiet_seconds": quiet, "sweep_seconds": 60}
    if early is not None:
        assembly["early_seconds"] = early
    if evidence is not None:
        assembly["evidence_seconds"] = evidence
    return {
        "dicom": {"ae_title": DAEMON_AET, "bind": "127.0.0.1", "port": free_port()},
        "storage": {"spool_dir": work / "spool", "min_free_mb": 1,
                    "database_url": f"sqlite:///{work / 'pacs-ai.db'}"},
        "assembly": assembly,
        "workers": {"count": 1, "lease_seconds": 120},
        "models": {"dir": models_dir},
        "retry": {"base_seconds": 1, "factor": 2, "cap_seconds": 4, "max_attempts": 5},
        "metrics": {"port": 0},
        "destinations": [{"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
                          "port": orthanc.dicom_port}],
    }


def report(mode: str, runs: list[dict[str, float]], model_times: list[float],
           args: argparse.Namespace, evidence_s: float) -> None:
    """The mode's stage table, its figures against the pure model time, its RESULT line."""
    latency, model_s = median([r["latency"] for r in runs]), median(model_times)
    ratio = latency / model_s
    print(f"{MODES[mode]}: where the time goes (median seconds; ack = storescu exited):")
    print("\n".join(stage_table(runs)))
    target = "~quiet window" if mode == "quiet" else f"<= {TARGET_RATIO}"
    met = "-" if mode == "quiet" else ("met" if ratio <= TARGET_RATIO else "missed")
    waited = {"evidence": evidence_s, "quiet": args.quiet}.get(mode, 0.0)
    print(f"  latency {latency:.3f} s (of which the {mode} wait {waited:g} s); pure CNN+LSTM "
          f"forward {model_s:.3f} s; ratio {ratio:.3f} (target {target}: {met}); "
          f"minus the wait {latency - waited:.3f} s, ratio {(latency - waited) / model_s:.3f}; "
          f"load {loadavg()}", flush=True)
    print(f"RESULT e2e mode={mode} latency_s={latency:.3f} model_s={model_s:.3f} "
          f"ratio={ratio:.3f} wait_s={waited:g} slices={args.slices} size={args.size} "
          f"repeats={len(runs)} quiet_s={args.quiet}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quiet", type=float, default=30.0, help="[assembly] quiet_seconds")
    parser.add_argument("--early", type=float, default=None,
                        help="[assembly] early_seconds (default: the daemon's; 0 = off)")
    parser.add_argument("--evidence", type=float, default=None,
                        help="[assembly] evidence_seconds (default: the daemon's)")
    parser.add_argument("--batch", type=int, default=32, help="batch of the pure forward")
    parser.add_argument("--timeout", type=float, default=300.0, help="per study, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    for tool in (STORESCU, "/usr/sbin/Orthanc"):
        if not Path(tool).exists():
            print(f"missing {tool}", file=sys.stderr)
            return 2

    from bench.inference import seed_pair
    from daemon.config import AssemblySettings
    from tests.daemon_proc import Daemon
    from tests.peers import Orthanc

    evidence_s = args.evidence
    if evidence_s is None:
        evidence_s = AssemblySettings().evidence_seconds
    root = Path(tempfile.mkdtemp(prefix="pacsai-bench-e2e-"))
    try:
        early = "default" if args.early is None else args.early
        print(f"e2e benchmark: {args.slices} x {args.size}x{args.size} phantom CT per study, "
              f"modes {', '.join(modes)}, quiet_seconds={args.quiet}, "
              f"evidence_seconds={evidence_s}, early_seconds={early}, 1 worker, SQLite, "
              f"Orthanc (TCP_NODELAY=1); 1 warm-up study + {args.repeats} per mode; "
              f"load {loadavg()}", flush=True)
        print(f"peers' documented waits after the last image: {PEER_WAITS}", flush=True)
        models_dir = seed_pair(root / "models", seed=7)
        plan = [("warm-up", "evidence")] + [
            (f"run {i + 1}", mode) for i in range(args.repeats) for mode in modes
        ]
        studies = [write_study(root / f"study{i}", args.slices, args.size, seed=7,
                               numbered=mode != "quiet")
                   for i, (_, mode) in enumerate(plan)]
        forward = pure_forward(models_dir, studies[0][1], args.batch)
        forward()  # trace once
        model_times: dict[str, list[float]] = {m: [] for m in modes}
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        with Orthanc(workdir=root / "orthanc") as orthanc:
            work = root / "daemon"
            work.mkdir()
            config = daemon_config(work, models_dir, orthanc, args.quiet, args.early,
                                   args.evidence)
            with Daemon(work, config) as daemon:
                for (label, mode), (study_uid, files) in zip(plan, studies, strict=True):
                    try:
                        marks = run_study(daemon, orthanc, study_uid, files, mode,
                                          args.timeout)
                    except RuntimeError:
                        print(f"daemon log (tail):\n{daemon.log()[-4000:]}", file=sys.stderr)
                        raise
                    model_s = timed(forward)
                    print(f"  {label:<8} {mode:<8} latency {marks['latency']:.3f} s "
                          f"(inference in daemon {marks.get('inference_s', float('nan')):.3f} "
                          f"s), pure forward {model_s:.3f} s; load {loadavg()}", flush=True)
                    if label == "warm-up":
                        continue
                    runs[mode].append(marks)
                    model_times[mode].append(model_s)
                if args.keep:
                    print(f"daemon log: {daemon.log_path}")
        for mode in modes:
            report(mode, runs[mode], model_times[mode], args, evidence_s)
        print(f"peers' documented waits after the last image: {PEER_WAITS}")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
