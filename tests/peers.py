"""Real DICOM peers for tests and benchmarks: Debian's Orthanc and DCMTK storescp.

Both run as child processes on free loopback ports with a temporary directory and
``TCP_NODELAY=1`` in their environment (without it they stall ~44 ms per instance).

    with Orthanc(modalities=[Modality("PACSAI", "127.0.0.1", 11112)]) as pacs:
        ...  # C-STORE to 127.0.0.1:pacs.dicom_port, called AE pacs.aet
        assert pacs.find_sr(study_uid)

    with StoreSCP() as scp:
        ...  # C-STORE to 127.0.0.1:scp.port; received files in scp.files()

    with RecordingSCP([EnhancedSRStorage], status=0xA700) as scp:
        ...  # an in-process pynetdicom SCP: only those SOP classes, that C-STORE status

Use ``require_orthanc()`` / ``require_dcmtk()`` at the top of a test (or fixture): they
skip when the program is missing, or fail when the environment variable ``CI`` is set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

ORTHANC_BIN = "/usr/sbin/Orthanc"
# Debian's orthanc-dicomweb package.
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DICOMWEB_ROOT = "/dicom-web/"
# Full path: pynetdicom installs a `storescp` of its own into the venv.
STORESCP_BIN = "/usr/bin/storescp"
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_CHARS = 3000


# Ports handed out by this process. One not yet bound by whoever asked looks free to the
# OS, which may offer it again: a daemon and an Orthanc once got the same port that way.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port that was free a moment ago on loopback and that no caller here got before."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _require(program: str, what: str) -> None:
    """Skip the calling test when `program` is missing, or fail it under CI."""
    if Path(program).is_file() and os.access(program, os.X_OK):
        return
    import pytest  # only tests call this; benchmarks may run without pytest

    message = f"{what} not installed ({program})"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_orthanc() -> None:
    """Skip (or, with $CI set, fail) the current test when Orthanc is not installed."""
    _require(ORTHANC_BIN, "Orthanc")


def require_orthanc_dicomweb() -> None:
    """Skip (or, with $CI set, fail) the current test without Orthanc's DICOMweb plugin."""
    _require(ORTHANC_BIN, "Orthanc")
    if not Path(DICOMWEB_PLUGIN).is_file():
        _require(DICOMWEB_PLUGIN, "Orthanc's DICOMweb plugin (orthanc-dicomweb)")


def require_dcmtk() -> None:
    """Skip (or, with $CI set, fail) the current test when DCMTK's storescp is not installed."""
    _require(STORESCP_BIN, "DCMTK")


def _peer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], deadline: float) -> bool:
    """Poll until something accepts TCP on `port`; False if `proc` died or time ran out."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _stop_process(proc: subprocess.Popen[bytes] | None, kill: bool) -> None:
    """SIGKILL now, or SIGTERM then SIGKILL after a grace period; always reaps the child."""
    if proc is None or proc.poll() is not None:
        return
    if kill:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except FileNotFoundError:
        return "(no log)"


class PeerError(RuntimeError):
    """A peer did not start or answered the REST API with an error."""


@dataclasses.dataclass(frozen=True)
class Modality:
    """A remote AE the Orthanc peer knows (our daemon, typically): may store, echo, find."""

    aet: str
    host: str = LOOPBACK
    port: int = 104


class Started:
    """Something a test starts and closes: `with Peer(...) as peer:` (the peer, typed as
    itself) starts it, and leaving the block closes it."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Peer(Started):
    """Shared lifecycle of a peer program: a child process, a temp dir."""

    def __init__(self, workdir: Path | None) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="pacsai-peer-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "peer.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether the child process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _spawn(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                list(argv),
                cwd=self.workdir,
                env=_peer_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self, *, kill: bool = False) -> None:
        """Stop the process (SIGTERM; `kill`: SIGKILL, a crash and quicker); `start()` resumes.

        Orthanc takes about 3.5 s to stop gracefully, storescp none.
        """
        _stop_process(self._proc, kill)
        self._proc = None

    def close(self) -> None:
        """Kill the process and delete the temporary directory (if this object created it)."""
        self.stop(kill=True)
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class Orthanc(_Peer):
    """A real Orthanc (Debian's) on free ports with its own config and temporary storage.

    Parameters
    ----------
    aet:
        Orthanc's own AE title (the called AE title for our associations).
    modalities:
        Remote AEs Orthanc knows (``DicomModalities``): put our daemon here so Orthanc
        accepts it when `allow_unknown` is False and can send storage commitment reports.
    allow_unknown:
        True: any calling AE may echo and store (``DicomAlwaysAllow*``). False: only the
        `modalities` may associate; others are rejected ("calling AE title not recognized").
    check_called_aet:
        ``DicomCheckCalledAet``: reject associations addressed to another AE title.
    workdir:
        Where storage, index, config and log live; a fresh temporary directory by default.
    dicom_port, http_port:
        Fixed ports (e.g. those of an earlier instance this one replaces); free ones by default.
    dicomweb:
        Load Debian's DICOMweb plugin (served under `dicomweb_url`).
    dicomweb_servers:
        DICOMweb servers Orthanc may send to (`/dicom-web/servers/{name}/stow`), by name:
        the plugin's `Servers` entries (``{"Url": ..., "HttpHeaders": {...}}``).
    """

    def __init__(
        self,
        aet: str = "ORTHANC",
        modalities: Sequence[Modality] = (),
        *,
        allow_unknown: bool = True,
        check_called_aet: bool = False,
        workdir: Path | None = None,
        dicom_port: int | None = None,
        http_port: int | None = None,
        dicomweb: bool = False,
        dicomweb_servers: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(workdir)
        self.aet = aet
        self.host = LOOPBACK
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.config_path = self.workdir / "orthanc.json"
        config = self._config(list(modalities), allow_unknown, check_called_aet)
        if dicomweb or dicomweb_servers:
            config["Plugins"] = [DICOMWEB_PLUGIN]
            config["DicomWeb"] = {
                "Enable": True,
                "Root": DICOMWEB_ROOT,
                "Servers": dict(dicomweb_servers or {}),
            }
        self.config_path.write_text(json.dumps(config, indent=2))

    def _config(
        self, modalities: list[Modality], allow_unknown: bool, check_called_aet: bool
    ) -> dict[str, Any]:
        return {
            "Name": f"pacsai-test-{self.aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": True,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": check_called_aet,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": allow_unknown,
            "DicomAlwaysAllowStore": allow_unknown,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowFindWorklist": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "DicomModalities": {
                f"peer{i}": {"AET": m.aet, "Host": m.host, "Port": m.port}
                for i, m in enumerate(modalities)
            },
            "DicomScpTimeout": 30,
            "StorageCommitmentReportsSize": 100,
            "SaveJobs": False,
            "StableAge": 60,
        }

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (with the plugin loaded), without a trailing slash."""
        return self.url + DICOMWEB_ROOT.rstrip("/")

    def start(self) -> None:
        """Start Orthanc (again, on the same storage and ports) and wait for REST and DICOM."""
        if self.running:
            return
        self._proc = self._spawn([ORTHANC_BIN, str(self.config_path)])
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and self._proc.poll() is None:
            try:
                self.rest("/system")
                break
            except (PeerError, OSError):
                time.sleep(0.1)
        if not _wait_for_port(self.dicom_port, self._proc, deadline):
            self.stop()
            raise PeerError(f"Orthanc did not start:\n{_tail(self.log_path)}")

    def rest(self, path: str, body: Any = None, method: str | None = None) -> Any:
        """JSON from the REST API: GET, or POST when `body` is given (sent as JSON)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise PeerError(f"{method or 'GET'} {path}: HTTP {exc.code}") from exc
        return json.loads(raw) if raw else None

    def instances(self) -> list[str]:
        """Orthanc IDs of every stored instance."""
        return list(self.rest("/instances"))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """An instance's tags by keyword (Orthanc's "simplified-tags")."""
        return dict(self.rest(f"/instances/{instance_id}/simplified-tags"))

    def instance_dicom(self, instance_id: str) -> bytes:
        """The stored DICOM file, as Orthanc keeps it."""
        url = f"{self.url}/instances/{instance_id}/file"
        with urllib.request.urlopen(url, timeout=10) as response:
            return bytes(response.read())

    def find_instances(self, study_uid: str, modality: str | None = None) -> list[str]:
        """Orthanc IDs of the instances of a study, optionally of one modality."""
        query = {"StudyInstanceUID": study_uid}
        if modality:
            query["Modality"] = modality
        return list(self.rest("/tools/find", {"Level": "Instance", "Query": query}))

    def find_sr(self, study_uid: str) -> list[dict[str, Any]]:
        """Simplified tags of every SR instance stored for the study, plus its Orthanc "ID"."""
        return [{"ID": i, **self.instance_tags(i)} for i in self.find_instances(study_uid, "SR")]


class StoreSCP(_Peer):
    """DCMTK's storescp: accepts every storage SOP class and writes what it receives.

    Parameters
    ----------
    aet:
        Its AE title (storescp answers to any called AE title unless told otherwise).
    extra_args:
        More storescp options, e.g. ``["--refuse"]`` to refuse every association.
    """

    def __init__(
        self,
        aet: str = "STORESCP",
        *,
        extra_args: Sequence[str] = (),
        workdir: Path | None = None,
    ) -> None:
        super().__init__(workdir)
        self.aet = aet
        self.host = LOOPBACK
        self.port = free_port()
        self.output_dir = self.workdir / "received"
        self.output_dir.mkdir(exist_ok=True)
        self._extra = list(extra_args)

    def start(self) -> None:
        """Start storescp (again, on the same port and output directory) and wait for it."""
        if self.running:
            return
        argv = [
            STORESCP_BIN,
            "--aetitle",
            self.aet,
            "--output-directory",
            str(self.output_dir),
            "--promiscuous",
            *self._extra,
            str(self.port),
        ]
        self._proc = self._spawn(argv)
        if not _wait_for_port(self.port, self._proc, time.monotonic() + START_TIMEOUT_S):
            self.stop()
            raise PeerError(f"storescp did not start:\n{_tail(self.log_path)}")

    def files(self) -> list[Path]:
        """The files received so far, sorted by name."""
        return sorted(p for p in self.output_dir.iterdir() if p.is_file())


class InProcessPeer(Started):
    """A peer started and stopped in this process (a test may stop and start it again);
    closing it stops it."""

    def stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stop()


class RecordingSCP(InProcessPeer):
    """An in-process pynetdicom SCP that accepts only `sop_classes` and answers `status`.

    For tests that need a peer with a narrow capability (e.g. Enhanced SR but not
    Comprehensive 3D SR), a given C-STORE status, a slow answer (`delay_s`) or TLS
    (`ssl_context`, a server-side context). `received` lists
    (SOP Class UID, SOP Instance UID, calling AE) of every C-STORE, whatever the status.
    """

    def __init__(
        self,
        sop_classes: Sequence[str],
        *,
        aet: str = "RECORDER",
        status: int = 0x0000,
        calling_aets: Sequence[str] = (),
        delay_s: float = 0.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.aet = aet
        self.host = LOOPBACK
        self.status = status
        self.delay_s = delay_s
        self.ssl_context = ssl_context
        self.received: list[tuple[str, str, str]] = []
        self._ae = AE(ae_title=aet)
        # Non-empty: other calling AE titles are rejected ("calling AE title not recognized").
        self._ae.require_calling_aet = list(calling_aets)
        self._ae.add_supported_context(Verification)
        for uid in sop_classes:
            self._ae.add_supported_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self._server: Any = None
        self.port = 0

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        self.received.append(
            (str(ds.SOPClassUID), str(ds.SOPInstanceUID), event.assoc.requestor.ae_title)
        )
        if self.delay_s:
            time.sleep(self.delay_s)  # a slow PACS: lets a test hit the DIMSE timeout
        return self.status

    def start(self) -> None:
        """Listen on a free loopback port (set in `port`), over TLS when given a context."""
        self._server = self._ae.start_server(
            (LOOPBACK, 0),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
            ssl_context=self.ssl_context,
        )
        self.port = int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None


class RecordingStow(InProcessPeer):
    """An in-process DICOMweb origin server whose answers a test sets (uvicorn, loopback).

    `answer(content_type, parts)` returns (HTTP status, DICOM JSON body or None) for each
    STOW-RS POST; `qido` gives (status, body) for each QIDO-RS GET. `requests` lists
    (method, path, query, Authorization header, parts) of every request.
    """

    def __init__(
        self,
        answer: Any = None,
        qido: tuple[int, Any] = (200, []),
    ) -> None:
        self.answer = answer or (lambda _ctype, _parts: (200, {}))
        self.qido = qido
        self.requests: list[tuple[str, str, str, str | None, list[bytes]]] = []
        self.port = 0
        self._server: Any = None
        self._thread: Any = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/dicomweb"

    async def _app(self, scope: Any, receive: Any, send: Any) -> None:
        from python_multipart.multipart import parse_options_header

        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        parts: list[bytes] = []
        ctype = headers.get("content-type", "")
        boundary = parse_options_header(ctype)[1].get(b"boundary")
        if boundary:
            for chunk in body.split(b"--" + boundary)[1:-1]:
                parts.append(chunk.split(b"\r\n\r\n", 1)[1][:-2])
        self.requests.append(
            (
                scope["method"],
                scope["path"],
                scope["query_string"].decode(),
                headers.get("authorization"),
                parts,
            )  # fmt: skip
        )
        status, answer = self.qido if scope["method"] == "GET" else self.answer(ctype, parts)
        content = b"" if answer is None else json.dumps(answer).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/dicom+json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": content})

    def start(self) -> None:
        import threading

        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(self._app, host=LOOPBACK, port=self.port, log_config=None,
                                access_log=False, lifespan="off", interface="asgi3")  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(10)
            self._server = None
