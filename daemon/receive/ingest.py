"""One received instance -> a durable spool file and its committed row, or a refusal.

The C-STORE handler hands the bytes it received here and answers the status returned: a
success only once the file and its row are durable.

Crash safety rests on one invariant: **a row's path always holds exactly the bytes of that
row's sha256**. A path may only be (re)written while no row points at it:

- New instance: write + fsync a temporary file, then inside the study-locked transaction
  rename it to `<SOP>.dcm`, fsync the directory, insert the row, commit. A crash after the
  rename and before the commit leaves a file that no row names: harmless, replaced by the
  resend (we never delete it after a failed commit, because the commit may have happened
  and only its acknowledgement was lost).
- Changed resend (same SOP Instance UID, other bytes): first give the current file a second,
  content-named hard link (`<SOP>.<sha16>.dcm`), fsync, and commit its row pointing there
  (still current). Only then does the new version take `<SOP>.dcm`, and the older row is
  marked superseded in the same transaction that inserts the new row. A crash between the
  steps leaves the old version current and intact under its content name; the resend finds
  that state and carries on.
- Identical resend: the (sop_instance_uid, sha256) row exists; success, nothing written.
- An older version sent again becomes current again (its row and file never changed).

The temporary file is written and fsync'd by a writer thread while the calling thread hashes
the bytes, parses the identifiers and starts the transaction (both are mostly outside the
GIL: the kernel copies and flushes, OpenSSL hashes); the rename waits for that fsync.

A DICOMweb STOW-RS request arrives as files instead (`Upload`: each part streamed to a
temporary file by the HTTP layer, hashed on the way): `admit` checks each one as soon as it
is complete, as C-STORE's instances are checked, and quarantines what it refuses;
`commit_admitted` commits the rest of the request as one group, so a request of many
instances pays one directory flush and one database flush (`store_uploads` does both).

All renames into place and row changes happen inside the database transaction that decides
them (SQLite: BEGIN IMMEDIATE; PostgreSQL: the study row is locked by its upsert), so two
senders of the same SOP Instance UID cannot interleave. Instances arriving on concurrent
associations share that transaction (group commit): each thread writes and fsyncs its own
temporary file, then the first to take the commit lock renames every waiting file, fsyncs
their directories once, writes all rows and commits once; every sender is answered after
that commit. One sender pays one directory flush and one database flush per instance;
several senders share them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import datetime as dt
import enum
import fcntl
import hashlib
import io
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian
from sqlalchemy import Connection, Engine, bindparam, text, update
from sqlalchemy.exc import (
    IntegrityError,
    InterfaceError,
    InternalError,
    OperationalError,
    ProgrammingError,
)

from daemon.db import audit
from daemon.db.schema import Instance, Study, UTCDateTime
from daemon.dicom import status
from daemon.logsetup import kv
from daemon.spool import InvalidUID, Spool, check_uid, is_conformant_uid

log = logging.getLogger(__name__)

SPACE_WARNING_INTERVAL = 60.0
UNDEFINED_LENGTH = 0xFFFFFFFF
# Values longer than this (pixel data) are skipped, not read, when a dataset is checked.
DEFER_BYTES = 4096
# What pydicom raises on bytes it cannot read as a dataset.
PARSE_ERRORS = (
    InvalidDicomError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    NotImplementedError,
    OverflowError,
    struct.error,
    zlib.error,
    UnicodeDecodeError,
)
# The database is away, locked past its timeout, or its schema is missing: the sender may
# try again later, so these are "out of resources", not a failure of the instance.
DB_UNAVAILABLE = (OperationalError, InterfaceError, InternalError, ProgrammingError)
MAX_ATTEMPTS = 4
WRITER_LOCK = ".receive-writer.lock"
# Threads writing temporary files; more concurrent stores wait for one (the disk serializes
# their flushes anyway).
FILE_WRITERS = 8
# How many studies the receiver remembers it audited, or warned about, per process.
REMEMBERED_STUDIES = 1024


class Outcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    REPLACED = "replaced"
    RESTORED = "restored"
    REWRITTEN = "rewritten"  # identical to the current version, whose file had gone


@dataclass(frozen=True)
class Identifiers:
    """What the receiver needs from a dataset; read without touching pixel data."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str | None
    body_part: str | None
    transfer_syntax_uid: str | None = None  # from the file meta, when there is one

    def instance_uids(self) -> tuple[tuple[str, str], ...]:
        """(attribute, UID) of the UIDs that name what is kept: study, series, instance."""
        return (
            ("StudyInstanceUID", self.study_uid),
            ("SeriesInstanceUID", self.series_uid),
            ("SOPInstanceUID", self.sop_instance_uid),
        )

    def malformed(self) -> tuple[str, ...]:
        """The attributes whose UID breaks PS3.5's rules (kept all the same, encoded on disk)."""
        return tuple(kw for kw, uid in self.instance_uids() if not is_conformant_uid(uid))


class _RecentKeys:
    """The last `limit` keys seen, oldest forgotten first: a bounded memory of done work."""

    def __init__(self, limit: int = REMEMBERED_STUDIES) -> None:
        self._keys: collections.OrderedDict[Any, None] = collections.OrderedDict()
        self._limit = limit

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def add(self, key: Any) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self._limit:
            self._keys.popitem(last=False)


@dataclass(frozen=True)
class Request:
    """A C-STORE as the handler saw it."""

    data: bytes
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    peer: str


@dataclass(frozen=True)
class Upload:
    """One instance of a multi-instance request (a STOW-RS part), streamed to a temporary file.

    `written` completes once the temporary file at `path` is durable (its OSError if that
    failed); None when the spool lacked room, in which case nothing was written and only the
    first bytes, `head`, were kept to name the instance in the answer.
    """

    path: Path | None
    written: concurrent.futures.Future[Path] | None
    size: int
    sha256: str
    head: bytes
    calling_ae: str
    peer: str
    label: str = ""  # where it came from, for the quarantine note (e.g. "STOW-RS part 3")


@dataclass(frozen=True)
class Admitted:
    """An upload `Ingestor.admit` checked: refused (`answer` is final) or awaiting its commit."""

    answer: Answer | None
    upload: Upload
    item: _Pending | None = None


@dataclass(frozen=True)
class Answer:
    """What became of one `Upload`: a C-STORE status code, and the instance when it was read."""

    status: int
    reason: str | None
    ids: Identifiers | None
    outcome: Outcome | None = None
    size: int = 0

    @property
    def ok(self) -> bool:
        return self.status == status.SUCCESS


class Refused(Exception):
    """The instance is answered with `code` and quarantined for `reason`."""

    def __init__(self, code: int, reason: str, detail: str, log_detail: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.code = code
        self.reason = reason
        self.detail = detail
        # What may go to the log: parser messages can quote element values (patient data),
        # so those stay in the quarantine note only.
        self.log_detail = detail if log_detail is None else log_detail


@dataclass
class _Upserted:
    """Study and series rows one transaction upserted: the instances of a request share them."""

    studies: dict[str, tuple[int, int]] = field(default_factory=dict)
    series: dict[tuple[int, str, str | None, str | None], int | None] = field(default_factory=dict)


@dataclass(eq=False)
class _Pending:
    """An instance whose temporary file is being written or durable, waiting for its commit."""

    ids: Identifiers
    transfer_syntax_uid: str
    calling_ae: str
    path: Path
    written: concurrent.futures.Future[Path]
    size: int
    sha: str
    result: Outcome | BaseException | None = None
    done: bool = False

    def temp_file(self) -> Path:
        """The durable temporary file, once its writer is done (its OSError if it failed)."""
        return self.written.result()

    def finish(self, result: Outcome | BaseException) -> None:
        self.result = result
        self.done = True


def response(code: int, comment: str | None = None) -> Dataset:
    """A status dataset; the comment (<= 64 chars, no patient data) helps the sender's log."""
    rsp = Dataset()
    rsp.Status = code
    if comment:
        rsp.ErrorComment = comment[:64]
    return rsp


def _text(ds: Dataset, tag: int) -> str | None:
    """An ASCII value (UI, CS) as sent, padding removed; read from the raw bytes when it can."""
    if tag not in ds:
        return None
    raw = ds.get_item(tag)
    value = raw.value
    if isinstance(value, bytes):  # not yet converted: skip pydicom's conversion and checks
        text = value.decode("latin-1")
    else:
        text = "" if value is None else str(value)
    return text.strip().rstrip("\x00").strip() or None


def _read(stream: BinaryIO, size: int, *, whole: bool = True) -> Dataset:
    """The dataset, pixel data left unread; EOFError when the stream is cut short.

    With `whole` False the stream is only the start of an instance: its end is not checked.
    """
    ds = dcmread(stream, force=True, defer_size=DEFER_BYTES)
    if not whole:
        return ds
    if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        # Inflated into a buffer of pydicom's own, where a deferred value's end is not ours
        # to check: read it whole.
        stream.seek(0)
        ds = dcmread(stream, force=True)
    elif stream.tell() > size:
        raise EOFError(f"stream ends {stream.tell() - size} bytes before its last value")
    _check_complete(ds)
    return ds


def read_identifiers(data: bytes) -> Identifiers:
    """The UIDs (and a little series metadata) of an encoded Part 10 stream, or Refused."""
    return _identifiers(io.BytesIO(data), len(data))


def read_file_identifiers(path: Path) -> Identifiers:
    """`read_identifiers` for a Part 10 file, reading its header only (pixel data skipped)."""
    with path.open("rb") as fh:
        return _identifiers(fh, os.fstat(fh.fileno()).st_size)


def _identifiers_in_head(head: bytes, size: int) -> Identifiers | None:
    """The identifiers when the first bytes of a `size`-byte file settle them, else None.

    They settle them when the header parses to the file's exact end (its pixel data skipped
    by length): then the file cannot be truncated either. Anything else, including a header
    longer than `head`, is left to `read_file_identifiers`.
    """
    stream = io.BytesIO(head)
    try:
        ds = dcmread(stream, force=True, defer_size=DEFER_BYTES)
        if (
            stream.tell() != size
            or ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        ):
            return None
        _check_complete(ds)
        return _identifiers(stream, size, dataset=ds)
    except (*PARSE_ERRORS, Refused):
        return None


def head_identifiers(head: bytes) -> Identifiers | None:
    """The identifiers in the first bytes of an instance, when they are there (else None)."""
    try:
        return _identifiers(io.BytesIO(head), len(head), whole=False)
    except Refused:
        return None


def _identifiers(
    stream: BinaryIO, size: int, *, whole: bool = True, dataset: Dataset | None = None
) -> Identifiers:
    """The identifiers of the dataset in `stream` (or of `dataset`, already read from it)."""
    try:
        ds = dataset if dataset is not None else _read(stream, size, whole=whole)
        uids = {
            kw: _text(ds, tag)
            for kw, tag in (
                ("StudyInstanceUID", 0x0020000D),
                ("SeriesInstanceUID", 0x0020000E),
                ("SOPInstanceUID", 0x00080018),
                ("SOPClassUID", 0x00080016),
            )
        }
        modality = _text(ds, 0x00080060)
        body_part = _text(ds, 0x00180015)
        syntax = ds.file_meta.get("TransferSyntaxUID")
    except PARSE_ERRORS as exc:
        raise Refused(
            status.CANNOT_PARSE_DATASET,
            "unparsable dataset",
            f"{type(exc).__name__}: {exc}",
            log_detail=type(exc).__name__,
        ) from exc
    missing = [kw for kw, uid in uids.items() if uid is None]
    if missing:
        raise Refused(status.MISSING_UID, "missing UID", "missing " + ", ".join(missing))
    return Identifiers(
        study_uid=str(uids["StudyInstanceUID"]),
        series_uid=str(uids["SeriesInstanceUID"]),
        sop_instance_uid=str(uids["SOPInstanceUID"]),
        sop_class_uid=str(uids["SOPClassUID"]),
        modality=modality[:16] if modality else None,
        body_part=body_part[:64] if body_part else None,
        transfer_syntax_uid=str(syntax) if syntax else None,
    )


def _check_complete(ds: Dataset) -> None:
    """Raise EOFError when the last element is shorter than its length says (truncated)."""
    keys = list(ds.keys())
    if not keys:
        raise EOFError("no data elements")
    raw = ds.get_item(keys[-1])
    length = getattr(raw, "length", UNDEFINED_LENGTH)
    value = getattr(raw, "value", None)
    if length != UNDEFINED_LENGTH and isinstance(value, bytes) and len(value) < length:
        raise EOFError(f"element {keys[-1]} has {len(value)} of {length} bytes")


def check_request(req: Request) -> Identifiers:
    """The dataset's identifiers once they agree with the command, or Refused."""
    ids = read_identifiers(req.data)
    if ids.sop_class_uid != req.sop_class_uid:
        raise Refused(
            status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "SOP class mismatch",
            f"command {req.sop_class_uid}, dataset {ids.sop_class_uid}",
        )
    if ids.sop_instance_uid != req.sop_instance_uid:
        raise Refused(
            status.SOP_INSTANCE_MISMATCH,
            "SOP instance mismatch",
            f"command {req.sop_instance_uid}, dataset {ids.sop_instance_uid}",
        )
    _check_uids(ids)
    return ids


def _check_uids(ids: Identifiers) -> None:
    """Refused unless every UID can name a file in the spool (malformed but harmless ones can)."""
    for attribute, uid in ids.instance_uids():
        try:
            check_uid(uid)
        except InvalidUID as exc:
            raise Refused(status.INVALID_UID, "invalid UID", f"{attribute}: {exc}") from exc


def check_upload(upload: Upload, expected_study: str | None) -> Identifiers:
    """An uploaded Part 10 file's identifiers once they are usable, or Refused.

    Read from the bytes kept in memory when they hold the whole header, else from the file.
    With `expected_study` (STOW-RS to /studies/{study}) an instance of another study is
    refused with `status.STUDY_MISMATCH`.
    """
    ids = _identifiers_in_head(upload.head, upload.size)
    if ids is None:
        assert upload.path is not None
        ids = read_file_identifiers(upload.path)
    if ids.transfer_syntax_uid is None:
        raise Refused(
            status.CANNOT_PARSE_DATASET,
            "not a DICOM file",
            "no file meta information (Transfer Syntax UID)",
        )
    _check_uids(ids)
    if expected_study is not None and ids.study_uid != expected_study:
        raise Refused(
            status.STUDY_MISMATCH,
            "study mismatch",
            f"instance of study {ids.study_uid} sent to study {expected_study}",
        )
    return ids


# The hot path's statements, written once (SQLite >= 3.35 and PostgreSQL share the syntax);
# timestamps go through the schema's UTC type so both engines store them as the ORM does.
UPSERT_STUDY = text(
    "INSERT INTO studies (study_uid, version, first_received_at, last_received_at) "
    "VALUES (:study_uid, 1, :now, :now) "
    "ON CONFLICT (study_uid) DO UPDATE SET last_received_at = excluded.last_received_at "
    "RETURNING id, version"
).bindparams(bindparam("now", type_=UTCDateTime()))
UPSERT_SERIES = text(
    "INSERT INTO series (study_id, series_uid, modality, body_part) "
    "VALUES (:study_id, :series_uid, :modality, :body_part) "
    "ON CONFLICT (series_uid) DO UPDATE SET "
    "modality = COALESCE(series.modality, excluded.modality), "
    "body_part = COALESCE(series.body_part, excluded.body_part) "
    "RETURNING id, study_id"
)
# Every row of the SOP Instance UID, purged ones included: the same bytes sent again after
# retention removed their file revive their row, which is the instance's history (results
# and reports point at it), rather than start a second one.
VERSIONS = text(
    "SELECT id, sha256, path, superseded_at, deleted_at FROM instances "
    "WHERE sop_instance_uid = :sop ORDER BY id"
)
INSERT_INSTANCE = text(
    "INSERT INTO instances (study_id, series_id, sop_instance_uid, sop_class_uid, "
    "transfer_syntax_uid, study_version, path, size, sha256, calling_ae, received_at) "
    "VALUES (:study_id, :series_id, :sop_instance_uid, :sop_class_uid, :transfer_syntax_uid, "
    ":study_version, :path, :size, :sha256, :calling_ae, :received_at)"
).bindparams(bindparam("received_at", type_=UTCDateTime()))
REVIVE_INSTANCE = text(
    "UPDATE instances SET study_id = :study_id, series_id = :series_id, "
    "sop_class_uid = :sop_class_uid, transfer_syntax_uid = :transfer_syntax_uid, "
    "study_version = :study_version, path = :path, size = :size, calling_ae = :calling_ae, "
    "received_at = :received_at, superseded_at = NULL, deleted_at = NULL "
    "WHERE id = :id AND sop_instance_uid = :sop_instance_uid AND sha256 = :sha256"
).bindparams(bindparam("received_at", type_=UTCDateTime()))


class Ingestor:
    """Stores received instances in the spool and the database; thread-safe.

    Parameters
    ----------
    spool
        Where files go (prepared by the caller).
    engine
        The database at head revision.
    min_free_bytes
        Below this much free space on the spool's filesystem new instances get 0xA700.
    on_stored
        Called with the Study Instance UID after each commit (not for refusals).
    on_outcome
        Called with the request and what storing it came to (e.g. a duplicate of what was
        already stored), after each commit.
    """

    def __init__(
        self,
        spool: Spool,
        engine: Engine,
        min_free_bytes: int,
        on_stored: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_outcome: Callable[[Request, Outcome], None] | None = None,
    ) -> None:
        self.spool = spool
        self.engine = engine
        self.min_free_bytes = min_free_bytes
        self.on_stored = on_stored
        self.on_outcome = on_outcome
        self._clock = clock
        self._warn_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._flock_path = spool.root / WRITER_LOCK if engine.dialect.name == "sqlite" else None
        self._flock_fd: int | None = None
        self._last_space_warning: float | None = None
        self._closed = False
        # Audit rows are never deleted, so a study found here needs no look-up.
        self._audited = _RecentKeys()
        # (study, attributes) already warned about: one line per study, not one per slice.
        self._warned_malformed = _RecentKeys()
        self._writers = concurrent.futures.ThreadPoolExecutor(
            FILE_WRITERS, thread_name_prefix="spool-write"
        )

    # The handler's entry point ---------------------------------------------------------

    def store(self, req: Request) -> Dataset:
        """Answer one C-STORE: success only after the file and its row are durable."""
        if self._closed:
            return response(status.OUT_OF_RESOURCES, "receiver stopping")
        written = self._start_write(req.data)
        try:
            return self._answer(req, written)
        finally:
            if written is not None:
                self._discard(written)

    def has_room(self) -> bool:
        """Whether the spool has `min_free_bytes` free (else instances get 0xA700)."""
        return self.spool.has_room(self.min_free_bytes)

    def room_bytes(self) -> int:
        """Bytes that may still be written before the spool falls under `min_free_bytes`."""
        return self.spool.free_bytes() - self.min_free_bytes

    def finish_upload(self, fh: BinaryIO, tmp: Path) -> concurrent.futures.Future[Path]:
        """Make a streamed temporary file durable on a writer thread (see `Upload.written`)."""
        return self._writers.submit(self.spool.finish_temp, fh, tmp)

    def _start_write(self, data: bytes) -> concurrent.futures.Future[Path] | None:
        """Begin writing the temporary file; None when the spool lacks room."""
        if not self.has_room():
            return None
        return self._writers.submit(self.spool.write_temp_file, data)

    def _discard(self, written: concurrent.futures.Future[Path]) -> None:
        """Remove the temporary file unless the commit renamed it into place."""
        try:
            tmp = written.result()
        except OSError:
            return  # write_temp_file removed its own partial file
        self.spool.discard_temp(tmp)

    def _answer(self, req: Request, written: concurrent.futures.Future[Path] | None) -> Dataset:
        try:
            ids = check_request(req)
        except Refused as refused:
            return self._refuse(req, refused)
        if written is None:
            self._warn_space()
            return response(status.OUT_OF_RESOURCES, "spool disk full")
        item = self._pending(ids, req.transfer_syntax_uid, req.calling_ae, written, req.data)
        self._commit_items([item])
        if isinstance(item.result, Refused):
            return self._refuse(req, item.result)
        code, reason = self._settled(item)
        if isinstance(item.result, Outcome):
            self._warn_malformed(ids, req.calling_ae)
            if self.on_outcome is not None:
                self.on_outcome(req, item.result)
        if code == status.SUCCESS and self.on_stored is not None:
            self.on_stored(ids.study_uid)
        return response(code, reason)

    def _pending(
        self,
        ids: Identifiers,
        transfer_syntax_uid: str,
        calling_ae: str,
        written: concurrent.futures.Future[Path],
        data: bytes,
    ) -> _Pending:
        path = self.spool.instance_path(ids.study_uid, ids.series_uid, ids.sop_instance_uid)
        sha = hashlib.sha256(data).hexdigest()
        return _Pending(ids, transfer_syntax_uid, calling_ae, path, written, len(data), sha)

    def _settled(self, item: _Pending) -> tuple[int, str | None]:
        """The status of a committed (or failed) instance, logging why it failed."""
        ids, result = item.ids, item.result
        if isinstance(result, Outcome):
            log.debug(
                "instance %s",
                result.value,
                extra=kv(sop=ids.sop_instance_uid, study=ids.study_uid, calling_ae=item.calling_ae),
            )
            return status.SUCCESS, None
        if isinstance(result, OSError):
            why, exc = "spool write failed", f"{type(result).__name__}: {result}"
        elif isinstance(result, DB_UNAVAILABLE):
            why = "database unavailable"
            exc = type(result.orig).__name__ if result.orig else type(result).__name__
        elif isinstance(result, BaseException):
            raise result
        else:
            raise RuntimeError(f"instance {ids.sop_instance_uid} was not committed")
        log.error(
            f"instance not stored: {why}",
            extra=kv(
                sop=ids.sop_instance_uid, study=ids.study_uid, calling_ae=item.calling_ae, exc=exc
            ),
        )
        return status.OUT_OF_RESOURCES, why

    def _refuse(self, req: Request, refused: Refused) -> Dataset:
        details = (
            f"calling_ae: {req.calling_ae}\npeer: {req.peer}\n"
            f"command_sop_class: {req.sop_class_uid}\n"
            f"command_sop_instance: {req.sop_instance_uid}\n"
            f"transfer_syntax: {req.transfer_syntax_uid}\n"
        )
        self._quarantine(
            refused,
            details,
            lambda note: self.spool.quarantine(req.data, refused.reason, note),
            sop=req.sop_instance_uid,
            calling_ae=req.calling_ae,
            peer=req.peer,
        )
        return response(refused.code, refused.reason)

    def _quarantine(
        self,
        refused: Refused,
        details: str,
        keep: Callable[[str], Path],
        **fields: Any,
    ) -> None:
        """Keep refused input with a note saying why; one warning line naming where."""
        note = f"code: 0x{refused.code:04X}\ndetail: {refused.detail}\n{details}"
        try:
            kept: Path | str = keep(note)
        except OSError as exc:
            kept = f"not kept ({type(exc).__name__}: {exc})"
        log.warning(
            "instance refused",
            extra=kv(
                reason=refused.reason,
                status=f"0x{refused.code:04X}",
                **fields,
                detail=refused.log_detail[:200],
                quarantine=kept,
            ),
        )

    # The STOW-RS entry point -----------------------------------------------------------

    def store_uploads(
        self, uploads: Sequence[Upload], expected_study: str | None = None
    ) -> list[Answer]:
        """Check and store the instances of one request, committed together; one answer each.

        Each answer is final: success only once the instance's file and row are durable.
        The caller owns the temporary files and removes what the commit did not rename.
        """
        return self.commit_admitted([self.admit(u, expected_study) for u in uploads])

    def admit(self, upload: Upload, expected_study: str | None = None) -> Admitted:
        """Check one upload as soon as it is complete (while later ones still stream).

        A refused upload is quarantined now and its answer is final; the others wait for
        `commit_admitted`.
        """
        if self._closed:
            ids = head_identifiers(upload.head)
            return Admitted(Answer(status.OUT_OF_RESOURCES, "receiver stopping", ids), upload)
        if upload.written is None or upload.path is None:
            self._warn_space()
            ids = head_identifiers(upload.head)
            return Admitted(Answer(status.OUT_OF_RESOURCES, "spool disk full", ids), upload)
        try:
            ids = check_upload(upload, expected_study)
        except Refused as refused:
            answer = self._refuse_upload(upload, refused, head_identifiers(upload.head))
            return Admitted(answer, upload)
        except OSError as exc:  # the temporary file is gone: its writer failed
            log.error(
                "instance not stored: spool write failed",
                extra=kv(part=upload.label, calling_ae=upload.calling_ae, exc=str(exc)),
            )
            return Admitted(Answer(status.OUT_OF_RESOURCES, "spool write failed", None), upload)
        path = self.spool.instance_path(ids.study_uid, ids.series_uid, ids.sop_instance_uid)
        syntax = str(ids.transfer_syntax_uid)
        item = _Pending(
            ids, syntax, upload.calling_ae, path, upload.written, upload.size, upload.sha256
        )
        return Admitted(None, upload, item)

    def commit_admitted(self, admitted: Sequence[Admitted]) -> list[Answer]:
        """Commit every admitted upload in one group; the answers in the same order."""
        self._commit_items([a.item for a in admitted if a.item is not None])
        answers: list[Answer] = []
        studies: dict[str, None] = {}
        for entry in admitted:
            item = entry.item
            if item is None:
                assert entry.answer is not None
                answers.append(entry.answer)
            elif isinstance(item.result, Refused):
                answers.append(self._refuse_upload(entry.upload, item.result, item.ids))
            else:
                code, reason = self._settled(item)
                outcome = item.result if isinstance(item.result, Outcome) else None
                answers.append(Answer(code, reason, item.ids, outcome, item.size))
                if outcome is not None:
                    studies[item.ids.study_uid] = None
                    self._warn_malformed(item.ids, item.calling_ae)
        if self.on_stored is not None:
            for study_uid in studies:
                self.on_stored(study_uid)
        return answers

    def _refuse_upload(self, upload: Upload, refused: Refused, ids: Identifiers | None) -> Answer:
        details = f"calling_ae: {upload.calling_ae}\npeer: {upload.peer}\nsource: {upload.label}\n"
        path = upload.path

        def keep(note: str) -> Path:
            if path is None:
                raise FileNotFoundError("nothing was written")
            return self.spool.quarantine_file(
                path, refused.reason, note, upload.size, upload.sha256
            )

        self._quarantine(
            refused,
            details,
            keep,
            sop=ids.sop_instance_uid if ids else "-",
            calling_ae=upload.calling_ae,
            peer=upload.peer,
            part=upload.label,
        )
        return Answer(refused.code, refused.reason, ids)

    def _warn_malformed(self, ids: Identifiers, calling_ae: str) -> None:
        """Say once per study which attributes carry a malformed UID that was kept anyway."""
        malformed = ids.malformed()
        if not malformed:
            return
        with self._warn_lock:
            if (ids.study_uid, malformed) in self._warned_malformed:
                return
            self._warned_malformed.add((ids.study_uid, malformed))
        log.warning(
            "malformed UID stored (not digits and dots as PS3.5 requires)",
            extra=kv(
                attribute=",".join(malformed),
                sop=ids.sop_instance_uid,
                study=ids.study_uid,
                calling_ae=calling_ae,
            ),
        )

    def _warn_space(self) -> None:
        now = self._clock()
        with self._warn_lock:
            last = self._last_space_warning
            if last is not None and now - last < SPACE_WARNING_INTERVAL:
                return
            self._last_space_warning = now
        log.warning(
            "spool below min_free_mb: refusing instances with 0xA700",
            extra=kv(
                free_mb=self.spool.free_bytes() // 2**20,
                min_free_mb=self.min_free_bytes // 2**20,
                spool=self.spool.root,
            ),
        )

    # Durable storage ------------------------------------------------------------------

    def _commit_items(self, items: list[_Pending]) -> None:
        """Join (or lead) a group commit of these files; each item's result once durable."""
        if not items:
            return
        self._queue.extend(items)
        # Group commit: whoever holds the lock commits every instance queued so far in one
        # transaction (one directory flush, one database flush for all of them). A thread
        # that gets the lock after its items were committed just returns.
        with self._commit_lock:
            if not all(item.done for item in items):
                self._commit_queued()

    def _commit_queued(self) -> None:
        batch: list[_Pending] = []
        while self._queue:
            batch.append(self._queue.popleft())
        try:
            with self._writer_turn():
                self._commit(batch)
        finally:
            for item in batch:
                if not item.done:
                    item.finish(RuntimeError("commit abandoned"))

    @contextlib.contextmanager
    def _writer_turn(self) -> Iterator[None]:
        """On SQLite, queue behind sibling receiver processes in the kernel (flock).

        SQLite's own busy handler sleeps up to 100 ms between retries, which would idle
        the other receiver processes; a blocking flock wakes the next writer at once.
        """
        if self._flock_path is None:
            yield
            return
        if self._flock_fd is None:
            self._flock_fd = os.open(self._flock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._flock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._flock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Stop the file writers (later stores get 0xA700) and release the file lock."""
        self._closed = True
        self._writers.shutdown(wait=True)
        if self._flock_fd is not None:
            os.close(self._flock_fd)
            self._flock_fd = None

    def _commit(self, batch: list[_Pending]) -> None:
        # One lock order for every writer (PostgreSQL locks each study row it upserts).
        pending = sorted(batch, key=lambda i: (i.ids.study_uid, i.ids.sop_instance_uid))
        for _ in range(MAX_ATTEMPTS):
            if not pending:
                return
            try:
                with self.engine.begin() as conn:
                    seen = _Upserted()
                    results = [self._record(conn, item, seen) for item in pending]
                    # The renames must be durable before the rows that name them commit.
                    renamed = (Outcome.STORED, Outcome.REPLACED)
                    self.spool.sync_dirs(
                        [i.path for i, r in zip(pending, results, strict=True) if r in renamed]
                    )
                    # Last write of the transaction: the audit lock is never held while waiting.
                    received = {
                        i.ids.study_uid
                        for i, r in zip(pending, results, strict=True)
                        if r in renamed and i.ids.study_uid not in self._audited
                    }
                    audit.record_studies_received(conn, received)
            except IntegrityError:
                if len(pending) > 1:
                    for item in pending:  # find the one that raced, let the others through
                        self._commit([item])
                    return
                continue  # another process stored the same bytes meanwhile: decide again
            except (*DB_UNAVAILABLE, OSError) as exc:
                for item in pending:
                    item.finish(exc)
                return
            for uid in received:
                self._audited.add(uid)
            again = []
            for item, result in zip(pending, results, strict=True):
                if result is None:
                    again.append(item)
                else:
                    item.finish(result)
            pending = again

    def _record(
        self, conn: Connection, item: _Pending, seen: _Upserted
    ) -> Outcome | Refused | OSError | None:
        """One instance's step in a transaction; None when it must go again after commit.

        Returns the outcome, or the refusal or file error that only this instance gets.
        `seen` holds the study and series rows this transaction upserted already.
        """
        ids, path, sha = item.ids, item.path, item.sha
        now = dt.datetime.now(dt.UTC)
        if ids.study_uid not in seen.studies:
            seen.studies[ids.study_uid] = self._upsert_study(conn, ids.study_uid, now)
        study_id, version = seen.studies[ids.study_uid]
        series_key = (study_id, ids.series_uid, ids.modality, ids.body_part)
        if series_key not in seen.series:
            seen.series[series_key] = self._upsert_series(conn, study_id, ids)
        series_id = seen.series[series_key]
        if series_id is None:
            return Refused(
                status.SERIES_IN_OTHER_STUDY,
                "series in other study",
                f"series {ids.series_uid} already belongs to another study",
            )
        every = conn.execute(VERSIONS, {"sop": ids.sop_instance_uid}).all()
        rows = [r for r in every if r.deleted_at is None]
        current = [r for r in rows if r.superseded_at is None]
        same = next((r for r in rows if r.sha256 == sha), None)
        if same is not None:
            if same.superseded_at is None:
                if os.path.exists(same.path):
                    return Outcome.DUPLICATE
                return self._rewrite(item, same)
            # An older version is sent again: it becomes current again, its file untouched.
            conn.execute(
                update(Instance)
                .where(Instance.id.in_([r.id for r in current]))
                .values(superseded_at=now)
            )
            conn.execute(update(Instance).where(Instance.id == same.id).values(superseded_at=None))
            conn.execute(update(Study).where(Study.id == study_id).values(changed_at=now))
            self._warn_changed(item, current, "older version restored")
            return Outcome.RESTORED
        # Compared after resolving symlinks: a spool configured through another path to the
        # same directory must still see that a row names this file.
        real = os.path.realpath(path) if rows else ""
        holder = next((r for r in rows if os.path.realpath(r.path) == real), None)
        if holder is not None:
            # Keep the bytes the row names under a content name before `path` is rewritten.
            try:
                aside = self.spool.keep_aside(path, holder.sha256)
            except OSError as exc:
                return exc
            conn.execute(update(Instance).where(Instance.id == holder.id).values(path=str(aside)))
            return None
        try:
            self.spool.rename_temp(item.temp_file(), path)
        except OSError as exc:
            return exc
        if current:
            conn.execute(
                update(Instance)
                .where(Instance.id.in_([r.id for r in current]))
                .values(superseded_at=now)
            )
            conn.execute(update(Study).where(Study.id == study_id).values(changed_at=now))
        purged = next((r.id for r in every if r.deleted_at is not None and r.sha256 == sha), None)
        conn.execute(
            INSERT_INSTANCE if purged is None else REVIVE_INSTANCE,
            {
                "id": purged,
                "study_id": study_id,
                "series_id": series_id,
                "sop_instance_uid": ids.sop_instance_uid,
                "sop_class_uid": ids.sop_class_uid,
                "transfer_syntax_uid": item.transfer_syntax_uid,
                "study_version": version,
                "path": str(path),
                "size": item.size,
                "sha256": sha,
                "calling_ae": item.calling_ae[:16],
                "received_at": now,
            },
        )
        if current:
            self._warn_changed(item, current, "changed instance stored as newer version")
            return Outcome.REPLACED
        return Outcome.STORED

    def _rewrite(self, item: _Pending, row: Any) -> Outcome | OSError:
        """An identical resend of an instance whose spool file is gone puts the file back
        where its row says (a duplicate answered without it would leave the row naming
        nothing); that may be a kept-aside path, so its directory is flushed here."""
        try:
            self.spool.commit_temp(item.temp_file(), Path(row.path))
        except OSError as exc:
            return exc
        log.warning(
            "instance file was missing from the spool: rewritten from its resend",
            extra=kv(
                sop=item.ids.sop_instance_uid,
                study=item.ids.study_uid,
                calling_ae=item.calling_ae,
                path=row.path,
            ),
        )
        return Outcome.REWRITTEN

    def _warn_changed(self, item: _Pending, older: list[Any], msg: str) -> None:
        log.warning(
            msg,
            extra=kv(
                sop=item.ids.sop_instance_uid,
                study=item.ids.study_uid,
                calling_ae=item.calling_ae,
                old_sha256=",".join(r.sha256[:16] for r in older) or "-",
                new_sha256=item.sha[:16],
            ),
        )

    def _upsert_study(self, conn: Connection, study_uid: str, now: dt.datetime) -> tuple[int, int]:
        """The study's id and version; the upsert also locks its row until commit."""
        row = conn.execute(UPSERT_STUDY, {"study_uid": study_uid, "now": now}).one()
        return int(row.id), int(row.version)

    def _upsert_series(self, conn: Connection, study_id: int, ids: Identifiers) -> int | None:
        """The series' id, or None when the UID already belongs to another study."""
        row = conn.execute(
            UPSERT_SERIES,
            {
                "study_id": study_id,
                "series_uid": ids.series_uid,
                "modality": ids.modality,
                "body_part": ids.body_part,
            },
        ).one()
        if row.study_id != study_id:
            return None
        return int(row.id)
