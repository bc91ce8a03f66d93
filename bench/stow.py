"""STOW-RS ingest: the same DICOMweb client into pacs-ai and into Orthanc's DICOMweb plugin.

    python -m bench.stow [--repeats 5] [--slices 200] [--clients 4]

The study is `bench.ingest`'s synthetic 200-slice 512x512 CT. Two loads, each against a
fresh target (new storage, new ports) every repeat:

- ``one``: one client, one STOW-RS request of all 200 instances;
- ``four``: 4 clients at once, each one request of 50 of them (the study split in four).

Clients are `dicomweb-client` (`DICOMwebClient.store_instances`) in processes of their own
that read their files first and start together on a signal. The figure is the exchange: from
the first request leaving a client to the last response (requests' `Response.elapsed`, through
dicomweb-client's `callback`), i.e. what the servers do; dicomweb-client first encodes the
datasets (~0.25 s for the 200, the same for both targets), and that total is printed too
(`total_seconds`). Targets:

- ``pacs-ai``: `pacs-ai serve` (`tests.daemon_proc.Daemon`) with SQLite (WAL,
  synchronous=FULL), no workers, the HTTP server on and a `store` token: every instance
  fsync'd (file and directory) and its row committed before the response, one commit per
  request.
- ``orthanc``: `/usr/sbin/Orthanc` with Debian's DICOMweb plugin, no authentication,
  `TCP_NODELAY=1` (its best: see `bench.ingest`), storage uncompressed.

Medians of the repeats, interleaved target by target; the last lines are
``RESULT stow clients=one|four target=pacs-ai|orthanc seconds=... instances_per_s=...
pacs_ratio=... total_seconds=...`` (pacs_ratio: exchange throughput of pacs-ai / the
target's, from the same run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.common import median

TOKEN_NAME = "bench"


def client_main(url: str, token: str, files: list[str]) -> int:
    """One client process: read the files, wait for "go" on stdin, store, print the times."""
    import pydicom
    from dicomweb_client import DICOMwebClient

    datasets = [pydicom.dcmread(f) for f in files]
    headers = {"Authorization": f"Bearer {token}"} if token else None
    exchanges: list[tuple[float, float]] = []

    def answered(response: Any, *args: Any, **kwargs: Any) -> Any:
        now = time.time()
        exchanges.append((now - response.elapsed.total_seconds(), now))
        return response

    client = DICOMwebClient(url, headers=headers, callback=answered)
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.time()
    answer = client.store_instances(datasets)
    end = time.time()
    stored = len(answer.get("ReferencedSOPSequence", []))
    sent, received = exchanges[-1]
    times = {"start": start, "end": end, "sent": sent, "answered": received, "stored": stored}
    print(json.dumps(times), flush=True)
    return 0 if stored == len(datasets) else 1


def run_clients(url: str, token: str, batches: list[list[Path]]) -> tuple[float, float]:
    """Start one client per batch, release them together; (exchange, total) seconds."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.stow", "--client", url, token, *map(str, batch)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for batch in batches
    ]
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("a client did not start")
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    times = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"a client failed (exit {proc.returncode}): {out[-300:]}")
        times.append(json.loads(out.strip().splitlines()[-1]))
    exchange = max(t["answered"] for t in times) - min(t["sent"] for t in times)
    return exchange, max(t["end"] for t in times) - min(t["start"] for t in times)


# Targets: each yields (DICOMweb root URL, token) for a fresh instance ---------------------

Target = Callable[[Path], contextlib.AbstractContextManager[tuple[str, str]]]


@contextlib.contextmanager
def pacs_ai(work: Path) -> Iterator[tuple[str, str]]:
    from daemon.http.auth import new_token
    from tests.daemon_proc import Daemon
    from tests.peers import free_port

    token, sha = new_token()
    http_port = free_port()
    config = {
        "dicom": {"ae_title": "PACSAI", "bind": "127.0.0.1", "port": free_port()},
        "storage": {"spool_dir": work / "spool", "min_free_mb": 64},
        "assembly": {"quiet_seconds": 600},
        "workers": {"count": 0},
        "models": {"dir": work / "models"},
        "metrics": {"port": 0},
        "http": {
            "bind": "127.0.0.1",
            "port": http_port,
            "tokens": [{"name": TOKEN_NAME, "sha256": sha, "role": "store"}],
        },
    }
    (work / "models").mkdir()
    with Daemon(work, config):
        _wait_http(http_port)
        yield f"http://127.0.0.1:{http_port}/dicomweb", token


@contextlib.contextmanager
def orthanc(work: Path) -> Iterator[tuple[str, str]]:
    from tests.peers import Orthanc

    with Orthanc(workdir=work / "orthanc", dicomweb=True) as peer:
        yield peer.dicomweb_url, ""


def _wait_http(port: int, timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as rsp:
                if rsp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"pacs-ai's HTTP server on {port} not ready after {timeout} s")


# The run ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--client"]:
        return client_main(argv[1], argv[2], argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--only", default="", help="comma list of targets: pacs-ai,orthanc")
    args = parser.parse_args(argv)
    from bench.ingest import write_ct_series

    with tempfile.TemporaryDirectory(prefix="pacsai-bench-stow-") as tmp:
        root = Path(tmp)
        files = write_ct_series(root / "data", args.slices, seed=1)
        size_mb = sum(p.stat().st_size for p in files) / 1e6
        per = -(-len(files) // args.clients)
        loads = {
            "one": [files],
            "four": [files[i : i + per] for i in range(0, len(files), per)],
        }
        print(
            f"STOW-RS benchmark: {args.slices} x 512x512 CT ({size_mb:.0f} MB), dicomweb-client; "
            f"one request of {len(files)}, then {args.clients} clients x {per}; median of "
            f"{args.repeats}, interleaved; {os.cpu_count()} CPUs",
            flush=True,
        )
        targets: dict[str, Target] = {"pacs-ai": pacs_ai, "orthanc": orthanc}
        if args.only:
            targets = {k: v for k, v in targets.items() if k in args.only.split(",")}
        times: dict[tuple[str, str], list[float]] = {}
        totals: dict[tuple[str, str], list[float]] = {}
        for load, batches in loads.items():
            for r in range(args.repeats):
                for name, target in targets.items():
                    with (
                        tempfile.TemporaryDirectory(prefix=f"{name}-{load}-{r}-", dir=root) as work,
                        target(Path(work)) as (url, token),
                    ):
                        seconds, total = run_clients(url, token, batches)
                    times.setdefault((load, name), []).append(seconds)
                    totals.setdefault((load, name), []).append(total)
                    print(
                        f"  {load:<4} {name:<8} run {r + 1}: {seconds:6.2f} s "
                        f"(with the client's encoding {total:.2f} s)",
                        flush=True,
                    )
        lines = []
        for (load, name), runs in times.items():
            secs = median(runs)
            ours = median(times.get((load, "pacs-ai"), []))
            ratio = secs / ours
            runs_text = " ".join(f"{t:.2f}" for t in runs)
            print(f"{load:<4} {name:<8} median {secs:6.2f} s  {len(files) / secs:6.1f} inst/s  "
                  f"(runs: {runs_text})")
            lines.append(
                f"RESULT stow clients={load} target={name} seconds={secs:.3f} "
                f"instances_per_s={len(files) / secs:.1f} pacs_ratio={ratio:.3f} "
                f"total_seconds={median(totals[(load, name)]):.3f}"
            )
        for line in lines:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
