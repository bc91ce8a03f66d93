"""Ingest benchmark: DCMTK storescu into pacs-ai's Receiver and its peers, in one run.

    python -m bench.ingest [--repeats 5] [--slices 200] [--processes 1] [--four-processes N]
                           [--max-pdu 262144]

Targets, each fresh (new storage, new port) for every repeat:

- ``pacs-ai``: `daemon.receive.Receiver`, SQLite (WAL, synchronous=FULL), file and directory
  fsync'd before each acknowledgement; ``[dicom] processes`` = 1 for one sender and one per
  CPU for four (its best configuration for each: a second process only helps parallel senders).
- ``storescp``: DCMTK ``/usr/bin/storescp --fork`` (writes files, no fsync).
- ``orthanc``: ``/usr/sbin/Orthanc`` with a temporary JSON config (SyncStorageArea on, its
  default), any AE allowed, HTTP bound to loopback without authentication.
- ``ceiling``: a minimal pynetdicom SCP in one process that only writes and fsyncs each file
  and its directory (the most a one-process pynetdicom receiver can do).
- ``ceiling-prompt``: the same over pacs-ai's transport (`daemon.dicom.transport`: the
  reactor waits on the socket instead of sleeping), i.e. what pacs-ai's own work costs.

DCMTK and Orthanc get ``TCP_NODELAY=1`` in their environment (their best configuration; the
Debian default stalls ~44 ms per instance, measured once here as information). storescu
senders get ``TCP_NODELAY=1`` for every target alike. Reports the median of the repeats
and ends with machine-readable ``RESULT ingest ...`` lines.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"
SCP_AET = "BENCHSCP"


# Data ------------------------------------------------------------------------------------


def write_ct_series(out: Path, slices: int, size: int = 512, seed: int = 0) -> list[Path]:
    """A synthetic CT series (one study) of `slices` real DICOM files; returns their paths."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size * 0.4) ** 2
    now = dt.datetime.now(dt.UTC)
    paths = []
    for i in range(slices):
        pixels = np.where(body, 40, -1000).astype(np.int16) + 1024
        pixels = pixels + rng.integers(0, 40, size=(size, size), dtype=np.int16)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = "Bench^Synthetic"
        ds.PatientID = f"BENCH{seed:04d}"
        ds.StudyDate = now.strftime("%Y%m%d")
        ds.StudyTime = now.strftime("%H%M%S")
        ds.AccessionNumber = f"B{seed:06d}"
        ds.Modality = "CT"
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-250.0, -250.0, -float(i) * 1.25]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceThickness = 1.25
        ds.PixelSpacing = [0.9765625, 0.9765625]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PixelData = pixels.astype(np.uint16).tobytes()
        path = out / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# Helpers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nodelay_env(on: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    if on:
        env["TCP_NODELAY"] = "1"
    else:
        env.pop("TCP_NODELAY", None)
    return env


def wait_for_echo(port: int, aet: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rc = subprocess.run(
            [ECHOSCU, "-aec", aet, "127.0.0.1", str(port)], capture_output=True, env=nodelay_env()
        ).returncode
        if rc == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"no C-ECHO answer on port {port} after {timeout} s")


def send(port: int, aet: str, batches: list[list[Path]]) -> float:
    """Run one storescu per batch, all at once; seconds until the last one ends."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [STORESCU, "-aet", "BENCHSCU", "-aec", aet, "127.0.0.1", str(port), *map(str, b)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=nodelay_env(),
        )
        for b in batches
    ]
    errors = []
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            errors.append(err.decode(errors="replace")[-400:])
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"storescu failed: {errors[0]}")
    return elapsed


# Targets: each is a context manager yielding (port, aet) for a fresh instance -------------

Target = Callable[[Path], contextlib.AbstractContextManager[tuple[int, str]]]


@contextlib.contextmanager
def pacs_ai(work: Path, processes: int, max_pdu: int) -> Iterator[tuple[int, str]]:
    from daemon.config import Settings
    from daemon.db.engine import make_engine
    from daemon.db.migrate import upgrade
    from daemon.receive import Receiver

    port = free_port()
    settings = Settings(
        dicom={
            "ae_title": SCP_AET,
            "port": port,
            "bind": "127.0.0.1",
            "processes": processes,
            "max_associations": 32,
            "max_pdu": max_pdu,
        },
        storage={"spool_dir": str(work / "spool"), "min_free_mb": 64},
    )
    engine = make_engine(settings.storage.effective_database_url)
    upgrade(engine)
    stored: list[str] = []
    receiver = Receiver(settings, engine, stored.append)
    receiver.start()
    try:
        yield receiver.port, SCP_AET
    finally:
        receiver.stop(5.0)
        engine.dispose()


@contextlib.contextmanager
def storescp(work: Path, nodelay: bool = True) -> Iterator[tuple[int, str]]:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        [STORESCP, "--fork", "-aet", SCP_AET, "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=nodelay_env(nodelay),
        start_new_session=True,
    )
    try:
        wait_for_echo(port, SCP_AET)
        yield port, SCP_AET
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(10)


@contextlib.contextmanager
def orthanc(work: Path, nodelay: bool = True) -> Iterator[tuple[int, str]]:
    port, http = free_port(), free_port()
    config = {
        "Name": "bench",
        "StorageDirectory": str(work / "orthanc-storage"),
        "IndexDirectory": str(work / "orthanc-index"),
        "DicomAet": SCP_AET,
        "DicomPort": port,
        "HttpPort": http,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "UnknownSopClassAccepted": True,
        "Plugins": [],
        "StorageCompression": False,
    }
    path = work / "orthanc.json"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen(
        [ORTHANC, str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=nodelay_env(nodelay),
        start_new_session=True,
    )
    try:
        wait_for_echo(port, SCP_AET)
        yield port, SCP_AET
    finally:
        proc.terminate()
        proc.wait(30)


@contextlib.contextmanager
def ceiling(work: Path, max_pdu: int, prompt: bool = False) -> Iterator[tuple[int, str]]:
    """pynetdicom, one process, writing and fsyncing each file and its directory: no more.

    With `prompt`, over pacs-ai's transport (daemon.dicom.transport) instead of pynetdicom's.
    """
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from daemon.dicom.network import start_server
    from daemon.receive.scp import TRANSFER_SYNTAXES, configure_pynetdicom
    from daemon.spool import fsync_dir

    configure_pynetdicom()
    out = work / "ceiling"
    out.mkdir()

    def handle(event: evt.Event) -> int:
        path = out / f"{event.request.AffectedSOPInstanceUID}.dcm"
        with path.open("wb") as fh:
            fh.write(event.encoded_dataset())
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(out)
        return 0

    ae = AE(ae_title=SCP_AET)
    ae.maximum_pdu_size = max_pdu
    ae.maximum_associations = 32
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
    server = start_server(
        ae, ("127.0.0.1", 0), [(evt.EVT_C_STORE, handle)], prompt=prompt, name="ceiling"
    )
    try:
        yield server.port, SCP_AET
    finally:
        server.shutdown()


# The run ---------------------------------------------------------------------------------


def measure(
    name: str, target: Target, batches: list[list[Path]], repeats: int, root: Path
) -> float:
    times = []
    for r in range(repeats):
        with (
            tempfile.TemporaryDirectory(prefix=f"{name}-{r}-", dir=root) as work,
            target(Path(work)) as (port, aet),
        ):
            times.append(send(port, aet, batches))
    med = statistics.median(times)
    n = sum(len(b) for b in batches)
    runs = " ".join(f"{t:.2f}" for t in times)
    print(f"  {name:<22} {med:7.2f} s {n / med:8.1f} inst/s   (runs: {runs})", flush=True)
    return med


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--sender-slices", type=int, default=100)
    parser.add_argument(
        "--processes", type=int, default=1, help="pacs-ai [dicom] processes, one sender"
    )
    parser.add_argument(
        "--four-processes",
        type=int,
        default=os.cpu_count() or 1,
        help="pacs-ai [dicom] processes, parallel senders (default: one per CPU)",
    )
    parser.add_argument("--max-pdu", type=int, default=262144, help="pacs-ai [dicom] max_pdu")
    parser.add_argument("--no-defaults", action="store_true", help="skip the Nagle-on figures")
    parser.add_argument("--only", default="", help="comma list of targets to run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for tool in (STORESCU, STORESCP, ECHOSCU, ORTHANC):
        if not Path(tool).exists():
            print(f"missing {tool}", file=sys.stderr)
            return 2

    with tempfile.TemporaryDirectory(prefix="pacsai-bench-") as tmp:
        root = Path(tmp)
        data = root / "data"
        one = [write_ct_series(data / "one", args.slices, seed=1)]
        many = [
            write_ct_series(data / f"s{k}", args.sender_slices, seed=10 + k)
            for k in range(args.senders)
        ]
        size_mb = sum(p.stat().st_size for p in one[0]) / 1e6
        print(
            f"ingest benchmark: {args.slices} x 512x512 CT ({size_mb:.0f} MB) by one storescu, "
            f"then {args.senders} storescu at once x {args.sender_slices} slices; "
            f"median of {args.repeats}; {os.cpu_count()} CPUs; pacs-ai processes="
            f"{args.processes} (one sender), {args.four_processes} (parallel) "
            f"max_pdu={args.max_pdu}",
            flush=True,
        )
        processes = {"one": args.processes, "four": args.four_processes}
        targets: dict[str, Target] = {
            "pacs-ai": lambda w: pacs_ai(w, processes[label], args.max_pdu),
            "orthanc": lambda w: orthanc(w),
            "storescp --fork": lambda w: storescp(w),
            "ceiling": lambda w: ceiling(w, args.max_pdu),
            "ceiling-prompt": lambda w: ceiling(w, args.max_pdu, prompt=True),
        }
        if args.only:
            wanted = set(args.only.split(","))
            targets = {k: v for k, v in targets.items() if k.split()[0] in wanted}
        results: dict[tuple[str, str], float] = {}
        for label, batches in (("one", one), ("four", many)):
            print(f"{label} sender(s):", flush=True)
            for name, target in targets.items():
                if label == "four" and name.startswith("ceiling"):
                    continue
                results[(label, name)] = measure(name, target, batches, args.repeats, root)
        if not args.no_defaults and not args.only:
            print("information: peers with Debian defaults (Nagle on), one sender, one run:")
            measure("orthanc (default)", lambda w: orthanc(w, nodelay=False), one, 1, root)
            measure("storescp (default)", lambda w: storescp(w, nodelay=False), one, 1, root)

        print("pacs-ai ratios (throughput pacs-ai / peer):")
        lines = []
        for (label, name), secs in results.items():
            n = args.slices if label == "one" else args.senders * args.sender_slices
            ratio = results.get((label, "pacs-ai"), float("nan")) and secs / results.get(
                (label, "pacs-ai"), float("nan")
            )
            if name != "pacs-ai":
                print(f"  {label:<5} vs {name:<16} {ratio:5.2f}x")
            lines.append(
                f"RESULT ingest senders={label} target={name.split()[0]} seconds={secs:.3f} "
                f"instances_per_s={n / secs:.1f} pacs_ratio={ratio:.3f}"
            )
        for line in lines:
            print(line)
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
