"""The HTTP server inside `pacs-ai serve`: up before READY=1, health as the watchdog sees it."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from dicomweb_client import DICOMwebClient

from tests.daemon_proc import Daemon, port_accepts, wait_for
from tests.integration.http.conftest import http_config, no_models, serving
from tests.integration.service.helpers import NotifySocket, listening_children
from tests.unit.http.conftest import STOW_TYPE, encode, multipart, study

WATCHDOG_USEC = 1_000_000


def base_url(daemon: Daemon) -> str:
    return f"http://127.0.0.1:{daemon.config['http']['port']}"


def test_ready_comes_after_the_http_port_accepts_and_health_follows_the_watchdog(
    tmp_path: Path, make_daemon: Callable[..., Daemon]
) -> None:
    config, _tokens = http_config(
        tmp_path,
        no_models(tmp_path),
        workers={"count": 0},
        dicom={"processes": 2, "drain_seconds": 2},
    )
    http_port = config["http"]["port"]
    notify = NotifySocket()
    daemon = make_daemon(config, env=notify.env(WATCHDOG_USEC))
    notify.probe = lambda: {"http_accepts": port_accepts(http_port)}
    daemon.start()
    with notify:
        ready = notify.first("READY", timeout=120)
        assert ready.seen["http_accepts"], "READY=1 before the HTTP port accepted"
        url = base_url(daemon)
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{url}/readyz").status_code == 200

        assert daemon.proc is not None
        receivers = listening_children(daemon.proc.pid, daemon.port)
        os.kill(receivers[0], signal.SIGKILL)
        unhealthy = wait_for(
            lambda: (r := httpx.get(f"{url}/healthz")).status_code == 503 and r.json(),
            30,
            "/healthz to turn 503",
        )
        assert unhealthy["faults"] == ["receiver not running"]
        assert httpx.get(f"{url}/readyz").status_code == 503
        # The watchdog sees the same fault.
        wait_for(
            lambda: any(
                d.fields["STATUS"].startswith("unhealthy: receiver not running")
                for d in notify.having("STATUS")
            ),
            30,
            "the same fault in STATUS",
        )
        daemon.kill()


def test_stow_counts_in_metrics_which_need_a_read_token(
    tmp_path: Path, make_daemon: Callable[..., Daemon]
) -> None:
    config, tokens = http_config(tmp_path, no_models(tmp_path), workers={"count": 0})
    daemon = make_daemon(config)
    url = serving(daemon)
    client = DICOMwebClient(
        f"{url}/dicomweb", headers={"Authorization": f"Bearer {tokens['store']}"}
    )
    client.store_instances(study(3))
    assert httpx.get(f"{url}/metrics").status_code == 401
    page = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {tokens['read']}"})
    assert page.status_code == 200
    assert (
        'pacsai_instances_received_total{calling_ae="store-client",status="0x0000"} 3.0'
        in page.text
    )
    assert 'pacsai_http_requests_total{route="dicomweb",status="200"} 1.0' in page.text
    assert "pacsai_jobs" in page.text
    assert daemon.stop() == 0


def test_a_port_in_use_fails_the_start_naming_the_setting(
    tmp_path: Path, make_daemon: Callable[..., Daemon]
) -> None:
    config, _tokens = http_config(tmp_path, no_models(tmp_path), workers={"count": 0})
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", config["http"]["port"]))
        squatter.listen(1)
        daemon = make_daemon(config)
        try:
            daemon.start(timeout=60)
        except RuntimeError:
            pass
        assert daemon.proc is not None
        assert daemon.proc.wait(60) == 1
    assert f"http.port {config['http']['port']} is in use" in daemon.log()


def test_a_large_body_streams_with_bounded_memory(
    tmp_path: Path, make_daemon: Callable[..., Daemon]
) -> None:
    """A 512 MiB instance goes through serve while its peak RSS grows by far less than that."""
    config, tokens = http_config(tmp_path, no_models(tmp_path), workers={"count": 0})
    daemon = make_daemon(config)
    url = serving(daemon)
    assert daemon.proc is not None
    before = peak_rss(daemon.proc.pid)
    size = 512 * 2**20
    rsp = httpx.post(
        f"{url}/dicomweb/studies",
        content=big_instance_body(size),
        headers={
            "Authorization": f"Bearer {tokens['store']}",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
        },
        timeout=300,
    )
    assert rsp.status_code == 200, rsp.text
    grown = peak_rss(daemon.proc.pid) - before
    assert grown < 64 * 2**20, f"peak RSS grew by {grown // 2**20} MiB for a 512 MiB body"
    rows = daemon.cli_json("jobs", "list")  # the daemon still answers its CLI
    assert isinstance(rows, list)


BOUNDARY = "big-instance-boundary"


def peak_rss(pid: int) -> int:
    """VmHWM of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def big_instance_body(pixel_bytes: int):  # type: ignore[no-untyped-def]
    """A one-part STOW-RS body of a CT whose pixel data is `pixel_bytes` long, generated."""
    import io

    from pydicom.uid import ExplicitVRLittleEndian

    ds = study(1)[0]
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    header = buffer.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00" + pixel_bytes.to_bytes(4, "little")
    yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + header
    chunk = b"\0" * 2**20
    for _ in range(pixel_bytes // len(chunk)):
        yield chunk
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def test_sigterm_lets_a_stow_request_in_flight_finish_and_store(
    tmp_path: Path, make_daemon: Callable[..., Daemon]
) -> None:
    config, tokens = http_config(
        tmp_path, no_models(tmp_path), workers={"count": 0}, dicom={"drain_seconds": 20}
    )
    daemon = make_daemon(config)
    url = serving(daemon)
    datasets = study(6)
    body = multipart([encode(ds) for ds in datasets])
    half = len(body) // 2
    signalled = threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield body[:half]
        daemon.signal(signal.SIGTERM)  # shutdown begins with the request half received
        signalled.set()
        time.sleep(1.0)
        yield body[half:]

    rsp = httpx.post(
        f"{url}/dicomweb/studies",
        content=slow_body(),
        headers={"Authorization": f"Bearer {tokens['store']}", "Content-Type": STOW_TYPE},
        timeout=60,
    )
    assert signalled.is_set()
    assert rsp.status_code == 200, rsp.text
    assert daemon.proc is not None and daemon.proc.wait(60) == 0
    assert f"stored={len(datasets)}" in daemon.log()
    assert not port_accepts(config["http"]["port"])
