"""An in-process HTTP face per test: real server on a free port, real spool, real database."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import Engine, select

from daemon.config import Settings
from daemon.db.schema import Instance
from daemon.http import HttpService
from daemon.http.auth import new_token
from daemon.spool import Spool
from tests.peers import free_port

CT_SMALL = Path(str(get_testdata_file("CT_small.dcm", download=False)))
ROLES = ("store", "read", "operator")


@dataclasses.dataclass
class Face:
    """A running HttpService and what a test needs to talk to it and check its work."""

    service: HttpService
    engine: Engine
    spool: Spool
    stored: list[str]
    tokens: dict[str, str]

    @property
    def url(self) -> str:
        scheme = "https" if self.service.settings.http.tls else "http"
        return f"{scheme}://127.0.0.1:{self.service.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicomweb"

    def auth(self, role: str = "store") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def rows(self) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(Instance).order_by(Instance.id)).all())

    def temp_files(self) -> list[Path]:
        return list(self.spool.tmp_dir.iterdir())

    def quarantined(self) -> list[Path]:
        return sorted(self.spool.quarantine_dir.glob("*.dcm"))


StartFace = Callable[..., Face]


def role_tokens(roles: tuple[str, ...]) -> tuple[dict[str, str], list[dict[str, str]]]:
    """A fresh token per role, and the `[[http.tokens]]` entries (named `<role>-client`)."""
    tokens: dict[str, str] = {}
    entries = []
    for role in roles:
        token, sha = new_token()
        tokens[role] = token
        entries.append({"name": f"{role}-client", "sha256": sha, "role": role})
    return tokens, entries


@pytest.fixture
def start_face(engine: Engine, tmp_path: Path) -> Iterator[StartFace]:
    """start_face(**[http] settings, min_free_mb=..., free_bytes=..., assembly=[assembly]
    settings) -> a running Face."""
    running: list[HttpService] = []

    def start(
        *,
        min_free_mb: int = 0,
        free_bytes: Callable[[Path], int] | None = None,
        assembly: dict[str, Any] | None = None,
        **http: Any,
    ) -> Face:
        tokens, entries = role_tokens(ROLES)
        config = {"bind": "127.0.0.1", "port": free_port(), "tokens": entries, **http}
        settings = Settings(
            storage={
                "spool_dir": str(tmp_path / "spool"),
                "min_free_mb": min_free_mb,
                "database_url": engine.url.render_as_string(hide_password=False),
            },
            http=config,
            assembly=assembly or {},
        )
        spool = Spool(
            settings.storage.spool_dir, **({"free_bytes": free_bytes} if free_bytes else {})
        )
        spool.prepare()
        stored: list[str] = []
        service = HttpService(
            settings, engine, spool, stored.append, health=lambda: [], ready=lambda: True
        )
        service.start()
        running.append(service)
        return Face(service, engine, spool, stored, tokens)

    yield start
    for service in running:
        service.stop(1.0)


@pytest.fixture
def face(start_face: StartFace) -> Face:
    return start_face()


def ct(study_uid: str | None = None, series_uid: str | None = None) -> Dataset:
    """A small CT instance with fresh UIDs (study and series may be given)."""
    ds = dcmread(CT_SMALL)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def study(n: int) -> list[Dataset]:
    """`n` instances of one new study and series."""
    first = ct()
    return [first] + [ct(first.StudyInstanceUID, first.SeriesInstanceUID) for _ in range(n - 1)]


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


BOUNDARY = "pacs-ai-test-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def multipart(
    parts: list[bytes], *, closing: bool = True, part_type: str = "application/dicom"
) -> bytes:
    """A multipart/related body of `parts` (without its closing boundary unless `closing`)."""
    out = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode() + part + b"\r\n"
        for part in parts
    )
    return out + (f"--{BOUNDARY}--\r\n".encode() if closing else b"")
