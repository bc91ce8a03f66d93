"""What the Study page reads from spooled files: header facts, an SR as text, heatmaps as PNG.

Only the study's own files (paths from its rows) are opened; patient name and ID are read
only when `[http] show_patient_data` is on.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom import Dataset
from pydicom.errors import InvalidDicomError

# What the page shows of the study's first instance (the default: no patient identity).
STUDY_FACTS = (
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "StudyID",
    "InstitutionName",
    "StationName",
    "Manufacturer",
)
PATIENT_FACTS = ("PatientName", "PatientID")
MAX_ITEMS = 5000  # an SR content tree is cut off there
IMAGE_LIBRARY = ("111028", "DCM")
REFERENCES = ("IMAGE", "COMPOSITE", "WAVEFORM")
MIN_RUN = 4  # this many references in a row under one name become one line
SR_CACHE = 64  # SR texts kept (a few KB each)


class Unreadable(Exception):
    """A spooled file is gone or is not DICOM; the page says so instead of the content."""


def _read(path: str | Path, *, pixels: bool = False) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except (OSError, InvalidDicomError, EOFError) as exc:
        raise Unreadable(f"{Path(path).name}: {exc}") from exc


def study_facts(path: str | None, with_patient: bool) -> dict[str, str]:
    """Accession, study date and description... of the study's first instance (patient name
    and ID only `with_patient`); empty when the file is gone."""
    if path is None:
        return {}
    try:
        ds = _read(path)
    except Unreadable:
        return {}
    keys = STUDY_FACTS + (PATIENT_FACTS if with_patient else ())
    return {k: str(ds.get(k, "") or "") for k in keys if ds.get(k)}


@dataclasses.dataclass(frozen=True)
class SrText:
    """An SR as the page shows it: a few header lines and its content tree, indented."""

    title: str
    header: list[tuple[str, str]]
    lines: list[tuple[int, str]]
    truncated: bool


def _meaning(seq: Any) -> str:
    return str(seq[0].CodeMeaning) if seq else ""


def _value(item: Dataset) -> str:
    """The value of one content item, as text."""
    kind = item.get("ValueType", "")
    if kind == "CODE":
        return _meaning(item.get("ConceptCodeSequence"))
    if kind == "NUM":
        measured = item.get("MeasuredValueSequence")
        if not measured:
            return "(no value)"
        unit = measured[0].get("MeasurementUnitsCodeSequence")
        unit_text = unit[0].CodeValue if unit else ""
        return f"{measured[0].NumericValue} {unit_text}".strip()
    if kind == "TEXT":
        return str(item.get("TextValue", ""))
    if kind == "UIDREF":
        return str(item.get("UID", ""))
    if kind == "PNAME":
        return str(item.get("PersonName", ""))
    if kind in ("DATETIME", "DATE", "TIME"):
        return str(item.get(kind.title().replace("Datetime", "DateTime"), ""))
    if kind in ("IMAGE", "COMPOSITE", "WAVEFORM"):
        refs = item.get("ReferencedSOPSequence")
        if not refs:
            return ""
        frames = refs[0].get("ReferencedFrameNumber")
        return f"{refs[0].ReferencedSOPInstanceUID}" + (f" frame {frames}" if frames else "")
    if kind in ("SCOORD", "SCOORD3D"):
        return str(item.get("GraphicType", ""))
    return ""


def _name(item: Dataset) -> tuple[str, tuple[str, str] | None]:
    """An item's concept name: its meaning, and (value, scheme) to recognise it."""
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return "", None
    return str(seq[0].CodeMeaning), (str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator))


def _walk(items: Any, depth: int, out: list[tuple[int, str]]) -> bool:
    """Append one line per content item, depth first; False once MAX_ITEMS is reached.

    What a reader skims past is shortened: the Image Library's entries are counted, not
    listed, and a run of references to images under one name (a series finding's slices)
    is one line with its first and last UID (an SR of a 200-slice series reads in tens of
    milliseconds instead of hundreds, and reads better).
    """
    items = list(items)
    i = 0
    while i < len(items):
        if len(out) >= MAX_ITEMS:
            return False
        item = items[i]
        name, code = _name(item)
        kind = item.get("ValueType", "")
        run = i + 1
        while kind in REFERENCES and run < len(items) and _name(items[run])[1] == code:
            run += 1
        if run - i >= MIN_RUN:
            first, last = _value(item), _value(items[run - 1])
            out.append((depth, f"{name}: {run - i} images, {first} ... {last}"))
            i = run
            continue
        if code == IMAGE_LIBRARY:
            out.append((depth, f"{name}: (the images referenced, not listed)"))
            i += 1
            continue
        value = _value(item)
        out.append((depth, f"{name}: {value}" if name and value else name or value))
        children = item.get("ContentSequence")
        if children and not _walk(children, depth + 1, out):
            return False
        i += 1
    return True


def sr_text(path: str) -> SrText:
    """An SR file's title, header and content tree (Unreadable when it cannot be read).

    Kept for the files last read (a report's file never changes under its name, and a
    page refreshing every few seconds would otherwise parse it each time).
    """
    try:
        stat = Path(path).stat()
    except OSError as exc:
        raise Unreadable(f"{Path(path).name}: {exc.strerror or exc}") from exc
    return _sr_text(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=SR_CACHE)
def _sr_text(path: str, _size: int, _mtime_ns: int) -> SrText:
    ds = _read(path)
    lines: list[tuple[int, str]] = []
    complete = _walk(ds.get("ContentSequence", []), 1, lines)
    header = [
        ("SOP Class", getattr(ds.SOPClassUID, "name", str(ds.SOPClassUID))),
        ("Series", str(ds.get("SeriesDescription", ""))),
        ("Content date/time", f"{ds.get('ContentDate', '')} {ds.get('ContentTime', '')}"),
        ("Completion", str(ds.get("CompletionFlag", ""))),
        ("Verification", str(ds.get("VerificationFlag", ""))),
    ]
    return SrText(_meaning(ds.get("ConceptNameCodeSequence")), header, lines, not complete)


def heatmap_caption(path: str) -> str:
    """What the heatmap shows, in its own words (Image Comments), or its series description."""
    try:
        ds = _read(path)
    except Unreadable as exc:
        return str(exc)
    return str(ds.get("ImageComments") or ds.get("SeriesDescription") or "")


def _eight_bit(pixels: np.ndarray) -> np.ndarray:
    """Scale a greyscale frame to 0..255."""
    low, high = float(pixels.min()), float(pixels.max())
    scale = 255.0 / (high - low) if high > low else 0.0
    return ((pixels.astype(np.float64) - low) * scale).astype(np.uint8)


def png(path: str) -> bytes:
    """A Secondary Capture (its first frame) as PNG bytes."""
    ds = _read(path, pixels=True)
    try:
        pixels = ds.pixel_array
    except (AttributeError, ValueError, RuntimeError) as exc:
        raise Unreadable(f"{Path(path).name}: {exc}") from exc
    if int(ds.get("NumberOfFrames") or 1) > 1:
        pixels = pixels[0]
    if str(ds.get("PhotometricInterpretation", "")) != "RGB":
        pixels = _eight_bit(pixels)
        if str(ds.get("PhotometricInterpretation")) == "MONOCHROME1":
            pixels = 255 - pixels
    elif pixels.dtype != np.uint8:
        pixels = _eight_bit(pixels)
    buffer = io.BytesIO()
    # Level 1: a 512x512 overlay in ~20 ms instead of ~80 (the browser keeps it an hour).
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
