"""Writing a built report to disk so that a crash never leaves half a file behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pydicom import Dataset


def write_dataset(ds: Dataset, path: str | os.PathLike[str]) -> Path:
    """Write ``ds`` as a DICOM file atomically: temp file in the same folder, fsync, rename.

    The daemon's spool module may take this over; until then this is the one place that
    writes reports, and it never leaves a partial file at ``path``.
    """
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    done = False
    try:
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
        done = True
    finally:
        if not done:
            Path(tmp_name).unlink(missing_ok=True)
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target
