"""Run every benchmark and end with one table (also written to bench/results.md).

    python -m bench [--quick] [--only ingest,stow,inference,e2e,console]

Each benchmark runs as its own subprocess (`python -m bench.<name>`), so a crash of one
does not lose the others; their `RESULT` lines feed the table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from bench.common import loadavg, machine, markdown_table, result_lines, text_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = Path(__file__).resolve().parent / "results.md"
BENCHES = ("ingest", "stow", "inference", "e2e", "console")
ARGS = {
    "ingest": [],
    "stow": [],
    "inference": [],
    "e2e": [],
    "console": [],
}
QUICK_ARGS = {
    "ingest": ["--repeats", "1", "--slices", "50", "--sender-slices", "25", "--no-defaults"],
    "stow": ["--repeats", "1", "--slices", "52"],
    "inference": ["--slices", "50", "--repeats", "2"],
    "e2e": ["--slices", "50", "--repeats", "2", "--quiet", "5"],
    "console": ["--studies", "1000", "--instances", "20", "--repeats", "3"],
}
TIMEOUT_S = 3 * 3600
# Targets from the issues: full/forward and e2e latency/model time at most 1.25x; ingest
# throughput ratios (pacs-ai / peer) at least these, per sender count and peer.
INFERENCE_TARGET = 1.25
CONSOLE_TARGET_MS = 200.0
E2E_TARGET = 1.25
INGEST_TARGETS = {
    ("one", "orthanc"): 1.0,
    ("one", "ceiling"): 0.9,
    ("four", "orthanc"): 1.5,
    ("four", "storescp"): 0.5,
}
# STOW-RS ingest throughput ratios (pacs-ai / Orthanc's DICOMweb plugin), same client.
STOW_TARGETS = {"one": 1.5, "four": 1.0}
# What each mode sends (kept in step with ARGS / QUICK_ARGS and the modules' defaults).
SIZES = {False: {"one": "1 sender, 200 slices", "four": "4 senders x 100 slices",
                 "inference": "inference, 200 slices"},
         True: {"one": "1 sender, 50 slices", "four": "4 senders x 25 slices",
                "inference": "inference, 50 slices"}}
PEERS = {"storescp": "storescp --fork", "orthanc": "Orthanc", "ceiling": "fsync ceiling",
         "ceiling-prompt": "fsync ceiling on pacs-ai's transport"}


def run_bench(name: str, quick: bool) -> tuple[int, str, float]:
    """Run `python -m bench.<name>`, echoing its output; (exit code, output, seconds)."""
    argv = [sys.executable, "-m", f"bench.{name}", *(QUICK_ARGS if quick else ARGS)[name]]
    print(f"== {' '.join(argv[1:])}  (load {loadavg()})", flush=True)
    start = time.monotonic()
    lines: list[str] = []
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line)
            if not _noise(line):
                sys.stdout.write(line)
                sys.stdout.flush()
        code = proc.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    return code, "".join(lines), time.monotonic() - start


def _noise(line: str) -> bool:
    """TensorFlow's start-up chatter, kept out of the terminal (it stays in the output)."""
    return any(s in line for s in ("oneDNN custom operations", "cpu_feature_guard",
                                   "rebuild TensorFlow", "To enable the following",
                                   "Unable to register cu", "TF-TRT", "computation placer",
                                   "absl::InitializeLog", "oneDNN supports"))


def _met(ok: bool) -> str:
    return "yes" if ok else "NO"


def _f(value: str | None) -> float:
    try:
        return float(value) if value is not None else float("nan")
    except ValueError:
        return float("nan")


def ingest_rows(results: list[dict[str, str]], quick: bool) -> list[list[str]]:
    by = {(r.get("senders"), r.get("target")): r for r in results}
    rows = []
    for senders in ("one", "four"):
        label = SIZES[quick][senders]
        ours = by.get((senders, "pacs-ai"))
        if ours is None:
            continue
        ours_txt = f"{_f(ours['seconds']):.2f} s ({_f(ours['instances_per_s']):.0f}/s)"
        for peer, peer_label in PEERS.items():
            theirs = by.get((senders, peer))
            if theirs is None:
                continue
            ratio = _f(theirs.get("pacs_ratio"))
            target, met = "-", "-"
            goal = INGEST_TARGETS.get((senders, peer))
            if goal is not None:
                target = f">= {goal:.2f}"
                met = _met(ratio >= goal)
            rows.append([f"ingest, {label}", f"pacs-ai vs {peer_label}", ours_txt,
                         f"{_f(theirs['seconds']):.2f} s ({_f(theirs['instances_per_s']):.0f}/s)",
                         f"{ratio:.2f} (throughput)", target, met])
    return rows


def inference_rows(results: list[dict[str, str]], quick: bool) -> list[list[str]]:
    rows = []
    for r in results:
        if r.get("format") == "cnn":  # the seed CNN under both runtimes: information only
            tf_rate, onnx_rate = _f(r.get("tf_images_per_s")), _f(r.get("onnx_images_per_s"))
            rows.append([SIZES[quick]["inference"], "seed CNN: TensorFlow vs ONNX Runtime",
                         f"{tf_rate:.0f} images/s", f"{onnx_rate:.0f} images/s",
                         f"{tf_rate / onnx_rate:.3f} (throughput)", "-", "-"])
            continue
        ratio = _f(r.get("ratio"))
        rows.append([f"{SIZES[quick]['inference']}, {r.get('format', 'seed')}",
                     "full vs pure forward",
                     f"{_f(r.get('full_s')):.3f} s",
                     f"{_f(r.get('forward_s')):.3f} s", f"{ratio:.3f} (time)",
                     f"<= {INFERENCE_TARGET}", _met(ratio <= INFERENCE_TARGET)])
    return rows


# How each e2e mode finds the study done (bench.e2e MODES).
E2E_MODES = {"mpps": "MPPS COMPLETED", "evidence": "evidence only", "quiet": "quiet window"}


def e2e_rows(results: list[dict[str, str]], quick: bool) -> list[list[str]]:
    rows = []
    for r in results:
        ratio = _f(r.get("ratio"))
        mode = r.get("mode", "")
        quiet = mode == "quiet"
        rows.append([f"end to end, {r.get('slices', '?')} slices, {E2E_MODES.get(mode, mode)}",
                     f"last ack -> SR in Orthanc (quiet {r.get('quiet_s', '?')} s) vs model",
                     f"{_f(r.get('latency_s')):.3f} s",
                     f"{_f(r.get('model_s')):.3f} s", f"{ratio:.3f} (time)",
                     "~quiet window" if quiet else f"<= {E2E_TARGET}",
                     "-" if quiet else _met(ratio <= E2E_TARGET)])
    return rows


def stow_rows(results: list[dict[str, str]], quick: bool) -> list[list[str]]:
    by = {(r.get("clients"), r.get("target")): r for r in results}
    slices = 52 if quick else 200
    labels = {"one": f"1 request of {slices}", "four": f"4 clients x {slices // 4}"}
    rows = []
    for load, goal in STOW_TARGETS.items():
        ours, theirs = by.get((load, "pacs-ai")), by.get((load, "orthanc"))
        if ours is None or theirs is None:
            continue
        ratio = _f(theirs.get("pacs_ratio"))
        rows.append([f"STOW-RS ingest, {labels[load]}", "pacs-ai vs Orthanc DICOMweb",
                     f"{_f(ours['seconds']):.2f} s ({_f(ours['instances_per_s']):.0f}/s)",
                     f"{_f(theirs['seconds']):.2f} s ({_f(theirs['instances_per_s']):.0f}/s)",
                     f"{ratio:.2f} (throughput)", f">= {goal:.2f}", _met(ratio >= goal)])
    return rows


def console_rows(results: list[dict[str, str]], quick: bool) -> list[list[str]]:
    """Each database's slowest page (median of its requests) against the 200 ms target."""
    size = "1,000 studies, 20,000 instances" if quick else "10,000 studies, 1,000,000 instances"
    rows = []
    for db in dict.fromkeys(r.get("db", "?") for r in results):
        timed = [r for r in results if r.get("db") == db and r.get("target_ms") != "-"]
        if not timed:
            continue
        slowest = max(timed, key=lambda r: _f(r.get("ms")))
        ms = _f(slowest.get("ms"))
        first = max(timed, key=lambda r: _f(r.get("first_ms")))
        rows.append([f"console pages, {size}", f"{db}: slowest of {len(timed)} pages (median)",
                     f"{ms:.0f} ms ({slowest.get('page')})",
                     f"first views <= {_f(first.get('first_ms')):.0f} ms ({first.get('page')})",
                     "-", f"< {CONSOLE_TARGET_MS:.0f} ms", _met(ms < CONSOLE_TARGET_MS)])
    return rows


ROWS = {"ingest": ingest_rows, "stow": stow_rows, "inference": inference_rows, "e2e": e2e_rows,
        "console": console_rows}
HEADER = ["Benchmark", "Compared", "pacs-ai", "Reference", "Ratio", "Target", "Met"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer slices and repeats")
    parser.add_argument("--only", default=",".join(BENCHES),
                        help=f"comma list of {', '.join(BENCHES)}")
    args = parser.parse_args(argv)
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(chosen) - set(BENCHES))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")

    load_before = loadavg()
    rows: list[list[str]] = []
    failures: list[str] = []
    for name in BENCHES:
        if name not in chosen:
            continue
        code, output, seconds = run_bench(name, args.quick)
        results = result_lines(output, name)
        if code != 0 or not results:
            tail = [ln for ln in output.splitlines() if ln.strip() and not _noise(ln)][-3:]
            failures.append(f"{name}: exit {code} after {seconds:.0f} s, "
                            f"{len(results)} RESULT lines; last: {' / '.join(tail)[-300:]}")
            rows.append([name, "failed", "-", "-", "-", "-", "NO"])
        rows.extend(ROWS[name](results, args.quick))

    info = machine()
    lines = [
        f"Date: {info['date']}{' (quick run: fewer slices and repeats)' if args.quick else ''}",
        f"Machine: {info['cpus']} CPUs, {info['cpu']}, {info['memory']} RAM; "
        f"load average {load_before} before, {info['loadavg']} after",
        f"Versions: Python {info['python']}; {info['storescu']}; {info['orthanc']}",
        "Peers with TCP_NODELAY=1 (their best); medians of repeats. Ingest ratio: pacs-ai's "
        "throughput / the reference's; inference and end to end: pacs-ai's time / the "
        "reference's.",
    ]
    print()
    print("\n".join(lines))
    print(text_table(HEADER, rows))
    for failure in failures:
        print(f"FAILED {failure}")
    md = ["# pacs-ai benchmark results", "", *(f"{ln}  " for ln in lines), "",
          markdown_table(HEADER, rows), ""]
    md += [f"- failed: {f}" for f in failures]
    RESULTS_MD.write_text("\n".join(md).rstrip() + "\n")
    print(f"(written to {RESULTS_MD.relative_to(ROOT)})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
