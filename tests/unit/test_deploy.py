"""The files an administrator installs are valid as shipped."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is required under CI (Debian package systemd)")
        pytest.skip("systemd-analyze not installed")
    return tool


def _unit_with_real_binary(tmp_path: Path) -> Path:
    # verify checks that ExecStart exists: point it at this venv's console script.
    binary = Path(sys.executable).parent / "pacs-ai"
    text = (DEPLOY / "pacs-ai.service").read_text()
    unit = tmp_path / "pacs-ai.service"
    unit.write_text(text.replace("/opt/pacs-ai/bin/pacs-ai", str(binary)))
    return unit


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    unit = _unit_with_real_binary(tmp_path)
    proc = subprocess.run(
        [tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""


def test_unit_exposure_is_rated_ok_or_better(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    unit = _unit_with_real_binary(tmp_path)
    proc = subprocess.run(
        [tool, "security", "--offline=true", "--threshold=30", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "Overall exposure level for pacs-ai.service" in proc.stdout


def test_unit_is_notify_with_watchdog_and_drains_within_stop_timeout() -> None:
    keys = dict(
        line.split("=", 1)
        for line in (DEPLOY / "pacs-ai.service").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert keys["Type"] == "notify"
    assert keys["KillMode"] == "mixed"
    assert keys["Restart"] == "on-failure"
    assert int(keys["WatchdogSec"]) > 0
    settings = load_settings(DEPLOY / "pacs-ai.toml", environ={})
    assert int(keys["TimeoutStopSec"]) > settings.dicom.drain_seconds
    assert keys["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert keys["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"


@pytest.mark.parametrize("name", ["pacs-ai.toml", "local.toml"])
def test_example_configs_are_valid(name: str) -> None:
    load_settings(DEPLOY / name, environ={})
