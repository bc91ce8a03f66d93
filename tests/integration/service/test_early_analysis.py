"""Early analysis: while a study is still in its quiet window the CNNs start on what arrived
(and, where the evidence rule may close it, while it arrives), and the analysis that follows
runs no file through a CNN again."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom

from models.phantom import write_series
from tests.daemon_proc import Daemon, storescu, wait_for
from tests.interop.conftest import daemon_config
from tests.peers import require_dcmtk

SLICES = 12


def _send_and_wait_analysed(
    tmp_path: Path,
    demo_models: Path,
    make_daemon: Callable[..., Daemon],
    *,
    report: dict[str, Any] | None = None,
    database_url: str | None = None,
    **assembly: float,
) -> tuple[Daemon, list[Path]]:
    require_dcmtk()
    files = write_series(tmp_path / "series", slices=SLICES, rows=64, cols=64, lesion=True,
                         seed=31)
    config = daemon_config(tmp_path, demo_models, database_url=database_url, report=report or {},
                           assembly={"quiet_seconds": 3, "sweep_seconds": 60,
                                     "evidence_seconds": 0, **assembly})
    daemon = make_daemon(config).start()
    assert storescu(daemon.port, files).returncode == 0
    wait_for(lambda: "report written" in daemon.log(), 120, "the study analysed and reported")
    return daemon, files


def _field(line: str, name: str) -> str:
    match = re.search(rf"\b{name}=(\S+)", line)
    assert match, (name, line)
    return match.group(1)


def test_cnns_start_in_the_quiet_window_and_the_analysis_reuses_every_file(
    tmp_path: Path, demo_models: Path, make_daemon: Callable[..., Daemon]
) -> None:
    daemon, files = _send_and_wait_analysed(tmp_path, demo_models, make_daemon,
                                            early_seconds=0.5)
    log = daemon.log().splitlines()
    early = [line for line in log if "early analysis done" in line]
    analysed = [line for line in log if "series analysed" in line]
    # The demo CNN explains its findings with heatmaps, which only the analysis makes: so
    # the early run stops at the CNN outputs and foresees no SR.
    assert [(_field(line, "series"), _field(line, "report")) for line in early] == [
        ("1", "False")
    ]
    assert [(_field(line, "images"), _field(line, "reused")) for line in analysed] == [
        (str(SLICES), str(SLICES))
    ]
    assert log.index(early[0]) < log.index(analysed[0])
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    kept = Path(daemon.config["storage"]["spool_dir"]) / "cache" / ds.StudyInstanceUID
    assert [p.name.split("-")[0] for p in kept.glob("*.npz")] == [
        f"{ds.SeriesInstanceUID}.demo"
    ]


def test_under_the_evidence_rule_the_cnns_run_while_the_study_arrives(
    tmp_path: Path, demo_models: Path, make_daemon: Callable[..., Daemon]
) -> None:
    daemon, _ = _send_and_wait_analysed(tmp_path, demo_models, make_daemon,
                                        early_seconds=0.5, evidence_seconds=2)
    log = daemon.log().splitlines()
    passes = [line for line in log
              if "study queued for early analysis" in line and "arriving=True" in line]
    (closed,) = [line for line in log if "study queued for analysis" in line]
    (analysed,) = [line for line in log if "series analysed" in line]
    assert passes and log.index(passes[0]) < log.index(closed)
    assert _field(closed, "reason") == "evidence"
    assert (_field(analysed, "images"), _field(analysed, "reused")) == (str(SLICES), str(SLICES))


def test_with_early_seconds_zero_the_analysis_runs_the_cnns_itself(
    tmp_path: Path, demo_models: Path, make_daemon: Callable[..., Daemon]
) -> None:
    daemon, _ = _send_and_wait_analysed(tmp_path, demo_models, make_daemon, early_seconds=0)
    log = daemon.log()
    assert "early analysis" not in log
    (line,) = [line for line in log.splitlines() if "series analysed" in line]
    assert (_field(line, "images"), _field(line, "reused")) == (str(SLICES), "0")


def test_an_early_run_without_heatmaps_prebuilds_the_sr_and_the_report_job_writes_it(
    tmp_path: Path, demo_models: Path, make_daemon: Callable[..., Daemon], database_url: str
) -> None:
    # On both databases: the results rows the analysis reads back (JSON details, floats) must
    # plan the very SR the early run planned from the rows it held in memory.
    daemon, files = _send_and_wait_analysed(tmp_path, demo_models, make_daemon,
                                            report={"heatmap_top_k": 0},
                                            database_url=database_url, early_seconds=0.5)
    log = daemon.log().splitlines()
    (early,) = [line for line in log if "early analysis done" in line]
    (written,) = [line for line in log if "report written" in line]
    assert _field(early, "report") == "True"
    assert _field(written, "prebuilt") == "True"
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    spool = Path(daemon.config["storage"]["spool_dir"])
    sr = spool / "reports" / study_uid / f"{_field(written, 'sr')}.dcm"
    (kept,) = (spool / "cache" / study_uid).glob("sr-v1-*.dcm")
    assert sr.read_bytes() == kept.read_bytes()
    assert pydicom.dcmread(sr).SOPInstanceUID == _field(written, "sr")
