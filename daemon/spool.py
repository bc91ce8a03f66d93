"""Atomic, fsync'd file storage for received instances, reports and quarantined input.

Every file is written to a temporary name inside the spool (so the final rename never
crosses a filesystem), flushed and fsync'd, renamed into place, and the directory that
received it (and any directory created on the way) fsync'd. A file is visible under its
final name only once its bytes are durable; a crash leaves at most a stray temporary file,
which `Spool.prepare` removes at the next start.

Layout (each UID as `uid_name` writes it: itself when it is digits and dots, else
`~` and its percent-encoding, e.g. a de-identifier's hex UID ``~dccc95...``)::

    <root>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm         the current version
    <root>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.<sha16>.dcm an older version, set aside
    <root>/reports/<StudyUID>/<SOPInstanceUID>.dcm             SRs written by the report stage
    <root>/quarantine/<stamp>-<reason>-<n>.dcm (+ .txt)        input we refused, with why
    <root>/cache/<StudyUID>/<name>                             what analysis may reuse
    <root>/.tmp/                                               temporary files
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_DIR = ".tmp"
QUARANTINE_DIR = "quarantine"
REPORTS_DIR = "reports"
CACHE_DIR = "cache"
ASIDE_DIGITS = 16
STALE_TEMP_SECONDS = 3600.0

# A UID as PS3.5 9.1 allows it: digits and dots, no empty component, at most 64 characters.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# Digits and dots (leading zeros too, as in the wild): such a UID names its file as it is.
_PLAIN_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# What makes a UID unsafe or meaningless, not merely malformed: control characters, path
# separators, an empty component that `..` would also be.
_UNSAFE_UID_RE = re.compile(r"[\x00-\x1f\x7f/\\]|\.\.")
UID_MAX_CHARS = 64
# Marks an encoded name; never the first character of a plain UID, never a `.` or `..`.
ENCODED_PREFIX = "~"
_REASON_RE = re.compile(r"[^a-z0-9-]+")


class InvalidUID(ValueError):
    """A UID no instance may be kept under: empty, too long, or unsafe as a name."""


def check_uid(uid: str) -> str:
    """`uid` unchanged when it can identify what we keep, else InvalidUID.

    Refused: empty, over 64 characters, control characters, path separators, `..`.
    Malformed but harmless UIDs (a de-identifier's hex digest) pass: `uid_name` encodes them.
    """
    if not uid or len(uid) > UID_MAX_CHARS or _UNSAFE_UID_RE.search(uid):
        raise InvalidUID(f"not a usable UID: {uid[:80]!r}")
    return uid


def uid_name(uid: str) -> str:
    """The file or directory name for a UID: itself when digits and dots, else encoded.

    The encoding (`~` and the UID percent-encoded) is one-to-one and never names a
    hidden file, `.` or `..`, so two UIDs never share a path.
    """
    check_uid(uid)
    if _PLAIN_UID_RE.match(uid):
        return uid
    return ENCODED_PREFIX + urllib.parse.quote(uid, safe="")


def is_conformant_uid(uid: str) -> bool:
    """Whether `uid` follows PS3.5 strictly (no leading zeros in a component)."""
    return len(uid) <= 64 and bool(_UID_RE.match(uid))


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on `path`'s filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class Spool:
    """The spool directory: atomic writes, set-aside versions, quarantine, free space.

    Parameters
    ----------
    root
        The spool directory; created (with its subdirectories) by `prepare`.
    free_bytes
        How to measure free space under a path; `disk_free_bytes` unless a test injects one.
    """

    def __init__(self, root: Path, free_bytes: Callable[[Path], int] = disk_free_bytes) -> None:
        self.root = Path(root).absolute()
        self.tmp_dir = self.root / TMP_DIR
        self.quarantine_dir = self.root / QUARANTINE_DIR
        self.reports_dir = self.root / REPORTS_DIR
        self.cache_dir = self.root / CACHE_DIR
        self._free_bytes = free_bytes

    def prepare(self, stale_seconds: float = STALE_TEMP_SECONDS) -> None:
        """Create the directories and drop temporary files a crash left behind.

        Only files older than `stale_seconds` go: another process (or host, on a shared
        spool) may be writing the younger ones right now.
        """
        for path in (self.root, self.tmp_dir, self.quarantine_dir, self.reports_dir):
            self.make_dirs(path)
        cutoff = time.time() - stale_seconds
        for leftover in self.tmp_dir.iterdir():
            try:
                if leftover.is_file() and leftover.stat().st_mtime < cutoff:
                    leftover.unlink()
            except FileNotFoundError:
                continue  # its writer renamed or removed it meanwhile

    # Paths ----------------------------------------------------------------------------

    def instance_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Where the current version of an instance lives; InvalidUID for unsafe UIDs."""
        return (
            self.root
            / uid_name(study_uid)
            / uid_name(series_uid)
            / f"{uid_name(sop_instance_uid)}.dcm"
        )

    def aside_path(self, path: Path, sha256: str) -> Path:
        """Where an older version of the file at `path` is kept; named by its content."""
        stem = path.name.removesuffix(".dcm")
        return path.with_name(f"{stem}.{sha256[:ASIDE_DIGITS]}.dcm")

    def report_path(self, study_uid: str, sop_instance_uid: str) -> Path:
        """Where the report stage writes an SR (or heatmap) it created."""
        return self.reports_dir / uid_name(study_uid) / f"{uid_name(sop_instance_uid)}.dcm"

    def cache_path(self, study_uid: str, name: str) -> Path:
        """Where analysis and report keep what they may reuse for a study (a plain name)."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"not a plain file name: {name!r}")
        return self.root / CACHE_DIR / uid_name(study_uid) / name

    def drop_cache(self, study_uid: str) -> None:
        """Forget what analysis kept for a study: it can all be computed again."""
        folder = self.root / CACHE_DIR / uid_name(study_uid)
        if folder.is_dir():
            shutil.rmtree(folder)

    # Writing --------------------------------------------------------------------------

    def make_dirs(self, path: Path) -> None:
        """`mkdir -p path`, fsyncing each parent that gained an entry."""
        missing: list[Path] = []
        probe = path
        while not probe.is_dir():
            missing.append(probe)
            probe = probe.parent
        for directory in reversed(missing):
            try:
                directory.mkdir()
            except FileExistsError:
                continue  # another writer made it; it is durable once they fsync'd the parent
            fsync_dir(directory.parent)
        if missing:
            fsync_dir(path)

    def write_temp(self, data: bytes) -> tuple[Path, int, str]:
        """Write `data` to a durable temporary file: (path, size, sha256)."""
        return self.write_temp_file(data), len(data), hashlib.sha256(data).hexdigest()

    def write_temp_file(self, data: bytes) -> Path:
        """Write `data` to a durable temporary file; a caller that hashes on its own uses this."""
        fh, tmp = self.open_temp()
        try:
            fh.write(data)
        except BaseException:
            fh.close()
            tmp.unlink(missing_ok=True)
            raise
        return self.finish_temp(fh, tmp)

    def open_temp(self) -> tuple[BinaryIO, Path]:
        """A new temporary file to stream into; `finish_temp` makes it durable."""
        fd, name = _mkstemp(self.tmp_dir)
        return os.fdopen(fd, "wb"), Path(name)

    def finish_temp(self, fh: BinaryIO, tmp: Path) -> Path:
        """Flush, fsync and close a file from `open_temp`; on failure remove it and raise."""
        try:
            with fh:
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def commit_temp(self, tmp: Path, path: Path) -> None:
        """Rename a durable temporary file to `path` (replacing it) and fsync the directory."""
        self.rename_temp(tmp, path)
        fsync_dir(path.parent)

    def rename_temp(self, tmp: Path, path: Path) -> None:
        """Rename a durable temporary file to `path`; durable only after `sync_dirs`."""
        self.make_dirs(path.parent)
        os.replace(tmp, path)

    def sync_dirs(self, paths: list[Path]) -> None:
        """fsync the directories holding `paths`, each once: makes their renames durable."""
        for directory in dict.fromkeys(p.parent for p in paths):
            fsync_dir(directory)

    def discard_temp(self, tmp: Path) -> None:
        """Remove a temporary file that will not be committed."""
        tmp.unlink(missing_ok=True)

    def write_atomic(self, path: Path, data: bytes) -> tuple[int, str]:
        """Write `data` durably to `path` (all or nothing): (size, sha256)."""
        tmp, size, digest = self.write_temp(data)
        try:
            self.commit_temp(tmp, path)
        except BaseException:
            self.discard_temp(tmp)
            raise
        return size, digest

    def keep_aside(self, path: Path, sha256: str) -> Path:
        """Give the file at `path` (content `sha256`) a second, content-named, durable name.

        A hard link, so the original name stays valid until the caller's database row no
        longer points at it; running it again after a crash finds the link already there.
        """
        aside = self.aside_path(path, sha256)
        try:
            os.link(path, aside)
        except FileExistsError:
            pass  # a previous attempt made it; the name is derived from the content
        fsync_dir(path.parent)
        return aside

    def remove(self, path: Path) -> None:
        """Delete a file (if there) and make the deletion durable."""
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(path.parent)

    def quarantine(self, data: bytes, reason: str, details: str) -> Path:
        """Keep refused input as `<stamp>-<reason>-<n>.dcm` with a `.txt` saying why.

        Returns the path of the data file.
        """
        tmp, size, digest = self.write_temp(data)
        try:
            return self.quarantine_file(tmp, reason, details, size, digest)
        finally:
            self.discard_temp(tmp)

    def quarantine_file(
        self, path: Path, reason: str, details: str, size: int, digest: str
    ) -> Path:
        """Keep a file in the spool (refused input already on disk) as `quarantine` does.

        The file gets a second name in the quarantine; the caller still owns `path`.
        """
        self.make_dirs(self.quarantine_dir)
        slug = _REASON_RE.sub("-", reason.lower()).strip("-")[:40] or "unknown"
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        n = 0
        while True:
            target = self.quarantine_dir / f"{stamp}-{slug}-{n}.dcm"
            try:
                # link, not rename: never replace another quarantined file of the same name
                os.link(path, target)
                break
            except FileExistsError:
                n += 1
        note = f"reason: {reason}\nsize: {size}\nsha256: {digest}\n{details.rstrip()}\n"
        self.write_atomic(target.with_suffix(".txt"), note.encode())
        return target

    # Space ----------------------------------------------------------------------------

    def free_bytes(self) -> int:
        """Free bytes on the spool's filesystem."""
        return self._free_bytes(self.root)

    def has_room(self, min_free_bytes: int) -> bool:
        """Whether at least `min_free_bytes` are free on the spool's filesystem."""
        return self.free_bytes() >= min_free_bytes


def _mkstemp(directory: Path) -> tuple[int, str]:
    return tempfile.mkstemp(dir=directory, prefix="w-", suffix=".part")
