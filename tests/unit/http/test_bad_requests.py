"""Bad requests: each a proper HTTP status, one log line, nothing half-written, still serving."""

from __future__ import annotations

import logging
import select
import socket
from collections.abc import Iterator

import httpx
import pytest

from daemon.logsetup import LineFormatter, quiet_libraries
from tests.unit.http.conftest import BOUNDARY, STOW_TYPE, Face, StartFace, ct, encode, multipart

LOGGERS = ("daemon", "uvicorn", "python_multipart")


def warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.split(".")[0] in LOGGERS
    ]


def rendered(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured record as the service writes it (message and key=value fields)."""
    formatter = LineFormatter(journald=False)
    return "\n".join(formatter.format(r) for r in caplog.records)


def still_serving(face: Face) -> None:
    rsp = httpx.post(
        f"{face.dicomweb}/studies",
        content=multipart([encode(ct())]),
        headers={**face.auth(), "Content-Type": STOW_TYPE},
    )
    assert rsp.status_code == 200


def assert_nothing_written(face: Face) -> None:
    assert face.rows() == []
    assert face.temp_files() == []


def raw(face: Face, data: bytes, *, wait: float = 10.0) -> bytes:
    """Send bytes on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", face.service.port), timeout=wait) as sock:
        sock.sendall(data)
        return _read_all(sock)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def trickle(sock: socket.socket, data: bytes, pause: float = 0.2) -> None:
    """Send one byte per `pause` until the server answers (or closes) or `data` runs out."""
    for byte in data:
        readable, _, _ = select.select([sock], [], [], pause)
        if readable:
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return


def post_head(face: Face, headers: dict[str, str], path: str = "/dicomweb/studies") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.fixture
def quick(start_face: StartFace, caplog: pytest.LogCaptureFixture) -> Iterator[Face]:
    """A face with short deadlines and a 1 MiB body cap; the log from its start is dropped."""
    quiet_libraries()  # as `serve` has them
    face = start_face(max_body_mb=1, header_timeout=1.0, body_timeout=1.0, body_min_rate_kb=64.0)
    caplog.clear()
    yield face


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, 401),
        ({"Authorization": "Bearer not-a-token-we-know"}, 401),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, 401),
    ],
    ids=["no token", "wrong token", "not bearer"],
)
def test_without_a_known_token_the_answer_is_401_and_the_log_never_holds_the_token(
    quick: Face, caplog: pytest.LogCaptureFixture, headers: dict[str, str], expected: int
) -> None:
    rsp = httpx.post(
        f"{quick.dicomweb}/studies",
        content=multipart([encode(ct())]),
        headers={**headers, "Content-Type": STOW_TYPE},
    )
    assert rsp.status_code == expected
    assert rsp.headers["www-authenticate"].startswith("Bearer")
    lines = warnings(caplog)
    assert len(lines) == 1
    text = rendered(caplog)
    assert "http request refused" in text
    assert "not-a-token-we-know" not in text and "dXNlcjpwYXNz" not in text
    assert_nothing_written(quick)
    still_serving(quick)


@pytest.mark.parametrize("role", ["read", "operator"])
def test_a_token_without_the_store_role_is_403(
    quick: Face, caplog: pytest.LogCaptureFixture, role: str
) -> None:
    rsp = httpx.post(
        f"{quick.dicomweb}/studies",
        content=multipart([encode(ct())]),
        headers={**quick.auth(role), "Content-Type": STOW_TYPE},
    )
    assert rsp.status_code == 403
    assert len(warnings(caplog)) == 1
    assert quick.tokens[role] not in rendered(caplog)
    assert_nothing_written(quick)


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/dicom", 415),
        ("multipart/form-data; boundary=x", 415),
        ('multipart/related; type="application/dicom+json"; boundary=x', 415),
        ('multipart/related; type="application/dicom"', 400),
        (None, 415),
    ],
    ids=["single part", "form-data", "metadata parts", "no boundary", "no content type"],
)
def test_a_body_that_is_not_multipart_related_dicom_is_refused(
    quick: Face, caplog: pytest.LogCaptureFixture, content_type: str | None, expected: int
) -> None:
    headers = quick.auth()
    if content_type:
        headers["Content-Type"] = content_type
    rsp = httpx.post(
        f"{quick.dicomweb}/studies", content=multipart([encode(ct())]), headers=headers
    )
    assert rsp.status_code == expected
    assert len(warnings(caplog)) == 1
    assert_nothing_written(quick)
    still_serving(quick)


@pytest.mark.parametrize(
    "body",
    [
        multipart([encode(ct())], closing=False),
        multipart([encode(ct())]).replace(BOUNDARY.encode(), b"another-boundary"),
        b"--" + BOUNDARY.encode() + b"\r\nno blank line ends these headers",
        multipart([encode(ct())], part_type="text/plain"),
    ],
    ids=["no closing boundary", "other boundary", "broken part headers", "text part"],
)
def test_a_broken_multipart_body_stores_nothing(
    quick: Face, caplog: pytest.LogCaptureFixture, body: bytes
) -> None:
    rsp = httpx.post(
        f"{quick.dicomweb}/studies",
        content=body,
        headers={**quick.auth(), "Content-Type": STOW_TYPE},
    )
    assert rsp.status_code in (400, 415)
    assert len(warnings(caplog)) == 1
    assert_nothing_written(quick)
    still_serving(quick)


def test_a_declared_body_over_max_body_mb_is_413_before_a_byte_of_it_is_read(
    quick: Face, caplog: pytest.LogCaptureFixture
) -> None:
    head = post_head(
        quick,
        {**quick.auth(), "Content-Type": STOW_TYPE, "Content-Length": str(10 * 2**30)},
    )
    response = raw(quick, head)  # no body sent at all: the answer cannot have waited for it
    assert status_of(response) == 413
    assert len(warnings(caplog)) == 1
    assert_nothing_written(quick)
    still_serving(quick)


def test_a_chunked_body_over_max_body_mb_is_cut_off_with_413(
    quick: Face, caplog: pytest.LogCaptureFixture
) -> None:
    sent = 0

    def endless() -> Iterator[bytes]:
        nonlocal sent
        yield multipart([encode(ct())], closing=False)
        while sent < 64 * 2**20:  # far more than the cap; the server stops reading first
            sent += 2**16
            yield b"\0" * 2**16

    try:
        rsp = httpx.post(
            f"{quick.dicomweb}/studies",
            content=endless(),
            headers={**quick.auth(), "Content-Type": STOW_TYPE},
        )
        assert rsp.status_code == 413
    except httpx.WriteError:
        pass  # the server answered and closed while we were still sending
    assert sent < 64 * 2**20
    assert len(warnings(caplog)) == 1
    assert_nothing_written(quick)
    still_serving(quick)


def test_a_client_sending_headers_one_byte_a_second_gets_408(
    quick: Face, caplog: pytest.LogCaptureFixture
) -> None:
    head = post_head(quick, {**quick.auth(), "Content-Type": STOW_TYPE, "Content-Length": "10"})
    with socket.create_connection(("127.0.0.1", quick.service.port), timeout=10) as sock:
        trickle(sock, head[:-1])  # never finishes its headers
        response = _read_all(sock)
    assert status_of(response) == 408
    assert len(warnings(caplog)) == 1
    assert_nothing_written(quick)
    still_serving(quick)


def test_a_client_sending_its_body_one_byte_a_second_gets_408_and_nothing_is_stored(
    quick: Face, caplog: pytest.LogCaptureFixture
) -> None:
    body = multipart([encode(ct())])
    head = post_head(
        quick, {**quick.auth(), "Content-Type": STOW_TYPE, "Content-Length": str(len(body))}
    )
    with socket.create_connection(("127.0.0.1", quick.service.port), timeout=10) as sock:
        sock.sendall(head + body[:1000])
        trickle(sock, body[1000:])
        response = _read_all(sock)
    assert status_of(response) == 408
    assert len(warnings(caplog)) == 1
    assert_nothing_written(quick)
    still_serving(quick)


def test_oversized_headers_get_431(quick: Face, caplog: pytest.LogCaptureFixture) -> None:
    head = post_head(quick, {"X-Padding": "a" * 40000, "Content-Type": STOW_TYPE})
    response = raw(quick, head)
    assert status_of(response) == 431
    assert len(warnings(caplog)) == 1
    still_serving(quick)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/dicomweb/studies/..%2F..%2Fetc%2Fpasswd", 404),
        ("/dicomweb/studies/..", 400),
        ("/dicomweb/../etc/passwd", 404),
        ("/dicomweb/studies/1.2.3%00", 400),
    ],
)
def test_paths_that_climb_out_are_refused(
    quick: Face, caplog: pytest.LogCaptureFixture, path: str, expected: int
) -> None:
    head = post_head(
        quick,
        {**quick.auth(), "Content-Type": STOW_TYPE, "Content-Length": "0", "Connection": "close"},
        path=path,
    )
    assert status_of(raw(quick, head)) == expected
    assert len(warnings(caplog)) == 1
    assert_nothing_written(quick)


def test_a_client_accepting_only_xml_gets_406(
    quick: Face, caplog: pytest.LogCaptureFixture
) -> None:
    rsp = httpx.post(
        f"{quick.dicomweb}/studies",
        content=multipart([encode(ct())]),
        headers={**quick.auth(), "Content-Type": STOW_TYPE, "Accept": "application/dicom+xml"},
    )
    assert rsp.status_code == 406
    assert len(warnings(caplog)) == 1
    assert_nothing_written(quick)


def test_a_malformed_request_line_gets_400(quick: Face, caplog: pytest.LogCaptureFixture) -> None:
    response = raw(quick, b"BREW /coffee HTCPCP/1.0 please\r\n\r\n")
    assert status_of(response) == 400
    assert len(warnings(caplog)) == 1
    still_serving(quick)
