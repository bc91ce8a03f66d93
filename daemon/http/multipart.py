"""A STOW-RS body (multipart/related of application/dicom) split into spool files as it streams.

Each part goes straight to a temporary file in the spool, hashed on the way; at its end
the file is fsync'd by the ingest's writer threads and the instance checked
(`Ingestor.admit`) while the next part streams. Memory holds one batch of the body and the
first `HEAD_BYTES` of the current part, whatever the body's size. What comes out is the
admitted uploads, for `Ingestor.commit_admitted`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from daemon.http.auth import HttpRefusal
from daemon.receive.ingest import Admitted, Ingestor, Upload

DICOM = "application/dicom"
# Kept in memory per part: enough for the identifiers when the spool has no room to write.
HEAD_BYTES = 65536
CLOSE = {"Connection": "close"}
# RFC 2046 says 70; Orthanc's DICOMweb client sends two UUIDs (73). python-multipart's cap.
MAX_BOUNDARY = 256


def stow_boundary(content_type: str | None) -> bytes:
    """The boundary of a STOW-RS body; 415 for another media type, 400 without a boundary."""
    media, raw = parse_options_header(content_type)
    params = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw.items()}
    if media != b"multipart/related":
        shown = media.decode("latin-1")[:60] or "none"
        raise HttpRefusal(415, f"Content-Type {shown} is not multipart/related", CLOSE)
    part_type = parse_options_header(params.get("type", DICOM))[0].decode("latin-1")
    if part_type != DICOM:
        raise HttpRefusal(
            415, f"multipart/related of {part_type[:60]}: only {DICOM} is stored", CLOSE
        )
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > MAX_BOUNDARY:
        raise HttpRefusal(
            400, f"multipart boundary missing or over {MAX_BOUNDARY} characters", CLOSE
        )
    return boundary.encode("latin-1")


class _Part:
    """The part being received: its headers, then its bytes going to a temporary file."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.field = bytearray()
        self.value = bytearray()
        self.fh: BinaryIO | None = None
        self.path: Path | None = None
        self.sha = hashlib.sha256()
        self.size = 0
        self.head = bytearray()


class PartWriter:
    """Feeds a multipart/related body to the parser; each part becomes a spool file.

    Call `feed` with the body's bytes, then `finish` for the admitted uploads; `discard`
    always (it removes every temporary file the commit did not take). `expected_study` is
    the study of a STOW-RS to /studies/{study}.
    """

    def __init__(
        self,
        ingestor: Ingestor,
        boundary: bytes,
        calling_ae: str,
        peer: str,
        expected_study: str | None = None,
    ) -> None:
        self._ingestor = ingestor
        self._calling_ae = calling_ae
        self._peer = peer
        self._expected_study = expected_study
        self._part: _Part | None = None
        self._uploads: list[Admitted] = []
        self._opened: list[tuple[BinaryIO, Path]] = []
        self._handles: dict[Path, BinaryIO] = {}  # files handed to a writer, for `discard`
        self._room: int | None = None  # free space over min_free_mb when last measured
        self._written = 0  # bytes written since
        self._ended = False
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._data,
                "on_part_end": self._end_part,
                "on_end": self._end,
            },
        )

    def feed(self, data: bytes) -> None:
        """Parse the next bytes of the body; HttpRefusal 400 or 415 when it cannot be stored."""
        if self._ended:
            return  # an epilogue after the closing boundary is ignored (RFC 2046)
        try:
            self._parser.write(data)
        except MultipartParseError as exc:
            raise HttpRefusal(400, f"broken multipart body: {str(exc)[:120]}", CLOSE) from exc

    def finish(self) -> list[Admitted]:
        """The admitted uploads, once the closing boundary was seen; HttpRefusal 400 otherwise."""
        if not self._ended:
            raise HttpRefusal(400, "multipart body ends before its closing boundary", CLOSE)
        if not self._uploads:
            raise HttpRefusal(400, "multipart body holds no instance")
        return list(self._uploads)

    def discard(self) -> None:
        """Remove the temporary files left (the stored ones were renamed into place)."""
        for fh, path in self._opened:
            fh.close()
            path.unlink(missing_ok=True)
        for admitted in self._uploads:
            upload = admitted.upload
            if upload.path is None or upload.written is None:
                continue
            if upload.written.cancel():  # never fsync'd: a duplicate or a refusal
                self._handles.pop(upload.path).close()
            # A writer still fsyncing it closes it; the unlinked file goes then.
            self._ingestor.spool.discard_temp(upload.path)

    # Parser callbacks -----------------------------------------------------------------

    def _begin(self) -> None:
        self._part = _Part()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        assert self._part is not None
        self._part.field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        assert self._part is not None
        self._part.value += data[start:end]

    def _header_end(self) -> None:
        part = self._part
        assert part is not None
        name = part.field.decode("latin-1").strip().lower()
        part.headers[name] = part.value.decode("latin-1").strip()
        part.field.clear()
        part.value.clear()

    def _headers_finished(self) -> None:
        part = self._part
        assert part is not None
        declared = part.headers.get("content-type")
        if declared is not None:
            media = parse_options_header(declared)[0].decode("latin-1")
            if media != DICOM:
                raise HttpRefusal(
                    415,
                    f"part {len(self._uploads) + 1} is {media[:60] or 'untyped'}, not {DICOM}",
                    CLOSE,
                )
        if self._has_room():
            try:
                part.fh, part.path = self._ingestor.spool.open_temp()
            except OSError:
                return  # answered "out of resources" like a spool without room
            self._opened.append((part.fh, part.path))

    def _has_room(self) -> bool:
        """Room for another part: the free space measured once, less what this request wrote
        since; measured again only when that budget runs out."""
        if self._room is None or self._room - self._written <= 0:
            self._room, self._written = self._ingestor.room_bytes(), 0
        return self._room - self._written > 0

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        assert part is not None
        chunk = memoryview(data)[start:end]
        part.sha.update(chunk)
        part.size += len(chunk)
        if len(part.head) < HEAD_BYTES:
            part.head += chunk[: HEAD_BYTES - len(part.head)]
        if part.fh is not None:
            self._written += len(chunk)
            try:
                part.fh.write(chunk)
            except OSError:  # the disk filled up: this part is answered "out of resources"
                self._drop_file(part)

    def _drop_file(self, part: _Part) -> None:
        assert part.fh is not None and part.path is not None
        self._opened.remove((part.fh, part.path))
        part.fh.close()
        part.path.unlink(missing_ok=True)
        part.fh = part.path = None

    def _end_part(self) -> None:
        part = self._part
        assert part is not None
        written: concurrent.futures.Future[Path] | None = None
        if part.fh is not None and part.path is not None:
            try:
                part.fh.flush()  # the whole part readable now; the fsync follows on a writer
            except OSError:
                self._drop_file(part)
        if part.fh is not None and part.path is not None:
            self._opened.remove((part.fh, part.path))
            self._handles[part.path] = part.fh
            written = self._ingestor.finish_upload(part.fh, part.path)
        upload = Upload(
            path=part.path,
            written=written,
            size=part.size,
            sha256=part.sha.hexdigest(),
            head=bytes(part.head),
            calling_ae=self._calling_ae,
            peer=self._peer,
            label=f"STOW-RS part {len(self._uploads) + 1}",
        )
        self._uploads.append(self._ingestor.admit(upload, self._expected_study))
        self._part = None

    def _end(self) -> None:
        self._ended = True
