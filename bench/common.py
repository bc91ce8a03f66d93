"""Shared benchmark helpers: medians, `RESULT` lines, the machine and versions, tables."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path

STORESCU = "/usr/bin/storescu"
ORTHANC = "/usr/sbin/Orthanc"

_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


def fields(text: str) -> dict[str, str]:
    """`key=value` pairs of a line (values may be double-quoted), quotes removed."""
    return {k: v[1:-1] if v.startswith('"') else v for k, v in _FIELD.findall(text)}


def result_lines(output: str, name: str) -> list[dict[str, str]]:
    """The fields of every `RESULT <name> k=v ...` line of a benchmark's output."""
    prefix = f"RESULT {name} "
    return [fields(line[len(prefix):]) for line in output.splitlines() if line.startswith(prefix)]


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg gives them."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _first_line(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({type(exc).__name__})"
    lines = [ln.strip() for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
    return lines[0] if lines else "?"


def machine() -> dict[str, str]:
    """Date, CPUs, CPU model, memory, load and tool versions, for the record."""
    cpu, flags = "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "?":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    # The forward passes' speed turns on it, and with it every ratio to model time: the seed
    # CNN under TensorFlow ran 363 images/s on a 2-core AVX-512 machine here, 52 on AVX2 alone.
    vectors = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"))
                    if flag in flags), "")
    cpu = f"{cpu} ({vectors})" if vectors else cpu
    memory = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except (OSError, ValueError):
        pass
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": str(os.cpu_count() or "?"),
        "cpu": cpu,
        "memory": memory,
        "loadavg": loadavg(),
        "python": platform.python_version(),
        "storescu": "DCMTK " + _first_line([STORESCU, "--version"]).strip("$ ")
        .removeprefix("dcmtk: "),
        "orthanc": "Orthanc " + _first_line([ORTHANC, "--version"]).split()[-1],
    }


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned table for the terminal."""
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)), line]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """The same table as GitHub Markdown."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)
