"""The operator console in a real browser (Debian's chromium driven by Playwright) while a
study arrives by DCMTK, is analysed by the demo model and delivered to a real Orthanc.

Screenshots of each page are saved in $PACSAI_SCREENSHOTS (default: the test's tmp_path);
the test prints where.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.daemon_proc import Daemon, storescu
from tests.interop.conftest import daemon_config
from tests.peers import Modality, Orthanc, free_port, require_dcmtk, require_orthanc
from tests.unit.http.console.conftest import PASSWORDS, users

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
# Long enough for the demo model to load, analyse and deliver on a busy 2-core box.
SLOW_MS = 180_000


def require_chromium() -> None:
    if Path(CHROMIUM).is_file():
        return
    if os.environ.get("CI"):
        pytest.fail(f"chromium is required under CI ({CHROMIUM}, tests/system-deps.sh)")
    pytest.skip("chromium not installed")


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    path = Path(os.environ.get("PACSAI_SCREENSHOTS") or tmp_path / "screenshots")
    path.mkdir(parents=True, exist_ok=True)
    print(f"console screenshots in {path}")
    return path


@pytest.fixture
def browser() -> Iterator[Any]:
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def study_files(tmp_path: Path, name: str, seed: int) -> tuple[list[Path], str]:
    from models.phantom import write_series

    files = write_series(tmp_path / name, slices=4, rows=48, cols=48, lesion=True, seed=seed)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    return files, uid


def signed_in(browser: Any, base: str, user: str) -> Any:
    """A page of a fresh browser context, logged in through the form."""
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.on("dialog", lambda dialog: pytest.fail(f"a page opened a dialog: {dialog.message}"))
    page.goto(f"{base}/console/")
    assert "/console/login" in page.url
    page.fill("input[name=user]", user)
    page.fill("input[name=password]", PASSWORDS[user])
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/console/")
    return page


def test_an_operator_watches_a_study_through_the_console_and_retries_a_dead_delivery(
    tmp_path: Path,
    demo_models: Path,
    make_daemon: Callable[..., Daemon],
    browser: Any,
    shots: Path,
) -> None:
    require_dcmtk()
    require_orthanc()
    http_port = free_port()
    config = daemon_config(
        tmp_path,
        demo_models,
        assembly={"quiet_seconds": 5, "sweep_seconds": 2},
        retry={"base_seconds": 1, "factor": 1, "cap_seconds": 1, "max_attempts": 2},
        http={"bind": "127.0.0.1", "port": http_port, "users": users()},
    )
    base = f"http://127.0.0.1:{http_port}"
    with Orthanc(modalities=[Modality("PACSAI", "127.0.0.1", config["dicom"]["port"])]) as pacs:
        config["destinations"] = [
            {"name": "orthanc", "ae_title": pacs.aet, "host": "127.0.0.1",
             "port": pacs.dicom_port},
        ]  # fmt: skip
        daemon = make_daemon(config).start()
        olga = signed_in(browser, base, "olga")

        # A study arrives: its page follows it from receiving to delivered, never reloading.
        files, uid = study_files(tmp_path, "first", seed=3)
        assert storescu(daemon.port, files).returncode == 0
        olga.goto(f"{base}/console/studies/{uid}")
        first = olga.get_attribute("#study-state", "data-state")
        assert first in ("receiving", "waiting")
        olga.evaluate("window.sameDocument = true")
        olga.wait_for_selector('#study-state[data-state="delivered"]', timeout=SLOW_MS)
        assert olga.evaluate("window.sameDocument") is True
        olga.wait_for_selector("#heatmaps img")
        olga.screenshot(path=str(shots / "study.png"), full_page=True)

        # A heatmap, rendered to PNG by the server.
        olga.click("#heatmaps a")
        olga.wait_for_function(
            "document.getElementById('heatmap-image').naturalWidth > 0", timeout=30_000
        )
        olga.screenshot(path=str(shots / "heatmap.png"), full_page=True)

        # The PACS goes away: the next study's deliveries die and show as dead letters.
        pacs.stop()
        files, second = study_files(tmp_path, "second", seed=4)
        assert storescu(daemon.port, files).returncode == 0
        olga.goto(f"{base}/console/failures")
        olga.wait_for_selector("button[data-retry]", timeout=SLOW_MS)
        olga.wait_for_function(  # every delivery of the study dead (SR and heatmaps)
            "document.querySelectorAll('button[data-retry]').length >= 2", timeout=SLOW_MS
        )
        olga.screenshot(path=str(shots / "failures.png"), full_page=True)
        olga.goto(f"{base}/console/")
        assert olga.inner_text("#dead-letters .big") != "0"

        # A viewer sees them, cannot retry them, and is refused when trying anyway.
        victor = signed_in(browser, base, "victor")
        victor.goto(f"{base}/console/failures")
        assert victor.locator("button[data-retry]").count() == 0
        olga.goto(f"{base}/console/failures")
        job_id = olga.get_attribute("button[data-retry]", "data-retry")
        csrf = re.search(r'name="csrf" value="([^"]+)"', victor.content())
        assert csrf is not None
        refused = victor.request.post(
            f"{base}/console/jobs/{job_id}/retry", form={"csrf": csrf.group(1)}
        )
        assert refused.status == 403

        # The PACS is back: the operator presses Retry on each dead letter; all delivered.
        pacs.start()
        while olga.locator("button[data-retry]").count():
            olga.click("button[data-retry] >> nth=0")
            olga.wait_for_load_state()
            assert "queued again" in olga.inner_text(".notice")
        olga.goto(f"{base}/console/studies/{second}")
        olga.wait_for_selector('#study-state[data-state="delivered"]', timeout=SLOW_MS)
        olga.screenshot(path=str(shots / "study-retried.png"), full_page=True)
        olga.goto(f"{base}/console/studies")
        olga.screenshot(path=str(shots / "studies.png"), full_page=True)
        olga.goto(f"{base}/console/")
        olga.screenshot(path=str(shots / "overview.png"), full_page=True)
        assert len(pacs.find_sr(second)) == 1
        assert daemon.stop() == 0
