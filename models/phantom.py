"""Synthetic CT phantom series written as real DICOM, for the demo model, tests and benchmarks."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
)

AIR_HU = -1000.0
FAT_HU = -100.0
TISSUE_HU = 40.0
BONE_HU = 700.0
LESION_HU = 140.0
INTERCEPT = -1024.0
STUDY_DATE = "20240101"
_UID_NAMESPACE = uuid.UUID("6f1c1f3e-3d0a-5b43-9a39-706163736169")


@dataclass(frozen=True)
class SyntheticSeries:
    """A written phantom series and its ground truth (0-based slice indices with lesion)."""

    paths: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    lesion_slices: frozenset[int]
    patient_id: str
    study_uid: str
    series_uid: str


@dataclass(frozen=True)
class _Lesion:
    """Where the lesion sits: centre in pixels, radius in pixels, first slice and slice count."""

    x: float
    y: float
    radius: float
    first: int
    count: int

    def radius_on(self, index: int) -> float:
        """Disc radius on a slice: a sphere-like profile whose ends keep half the radius."""
        if not self.first <= index < self.first + self.count:
            return 0.0
        t = (index - self.first - (self.count - 1) / 2.0) / max(self.count / 2.0, 1.0)
        return self.radius * float(np.sqrt(max(0.25, 1.0 - t * t)))


def _plan_lesion(rng: np.random.Generator, slices: int, rows: int, cols: int) -> _Lesion:
    """A random lesion inside the body ellipse, spanning 2-6 consecutive slices."""
    count = int(rng.integers(min(2, slices), min(6, slices) + 1))
    first = int(rng.integers(0, slices - count + 1))
    angle = rng.uniform(0.0, 2.0 * np.pi)
    reach = rng.uniform(0.0, 0.55)
    return _Lesion(
        x=cols / 2.0 + np.cos(angle) * reach * 0.40 * cols,
        y=rows / 2.0 + np.sin(angle) * reach * 0.28 * rows,
        radius=float(rng.uniform(0.05, 0.09) * min(rows, cols)),
        first=first,
        count=count,
    )


@dataclass(frozen=True)
class _Blob:
    """An ellipse of one density: centre and half-axes in pixels, HU."""

    x: float
    y: float
    ax: float
    ay: float
    hu: float

    def mask(self, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        return ((xx - self.x) / self.ax) ** 2 + ((yy - self.y) / self.ay) ** 2 <= 1.0


@dataclass(frozen=True)
class _Anatomy:
    """Everything but the lesion, fixed for a series: a plain phantom, or a varied one.

    Varied backgrounds (other zooms, outlines, fat, organs, spines, noise and stored
    windows) are what the demo model trains on, so that "lesion" means a lesion and
    not "a CT slice that looks unlike the plain phantom".
    """

    body: _Blob  # the outer ellipse; its HU is the soft tissue's
    outline: tuple[tuple[float, float, float], ...] = ()  # (order, amplitude, phase) wobbles
    tissue_level: float = 0.85  # soft tissue where the body's ellipse equation is below this
    fat_hu: float = FAT_HU
    spine: _Blob | None = None
    inside: tuple[_Blob, ...] = ()  # organs, drawn in order
    noise_hu: float = 12.0
    smooth: bool = False
    lesion_hu: float = LESION_HU
    stored_window: tuple[float, float] = (40.0, 400.0)
    signed: bool = False


def _plain_anatomy(rng: np.random.Generator, rows: int, cols: int) -> _Anatomy:
    """The original phantom: a fat-rimmed soft-tissue ellipse with a spine."""
    ax, ay = cols * rng.uniform(0.36, 0.44), rows * rng.uniform(0.26, 0.34)
    cx, cy = cols / 2.0, rows / 2.0
    radius = 0.07 * min(rows, cols)
    return _Anatomy(
        body=_Blob(cx, cy, ax, ay, TISSUE_HU),
        spine=_Blob(cx, cy + 0.6 * ay, radius, radius, BONE_HU),
    )


def _varied_anatomy(rng: np.random.Generator, rows: int, cols: int) -> _Anatomy:
    """A normal background drawn at random: zoom, outline, fat, organs, spine, noise."""
    size = float(min(rows, cols))
    zoom = rng.uniform(0.8, 2.2)  # above ~1.3 the body runs off the image, as in a small FOV
    ax, ay = cols * 0.40 * zoom * rng.uniform(0.85, 1.1), rows * 0.30 * zoom * rng.uniform(0.8, 1.2)
    cx = cols / 2.0 + rng.uniform(-0.08, 0.08) * cols * zoom
    cy = rows / 2.0 + rng.uniform(-0.08, 0.08) * rows * zoom
    outline = tuple(
        (float(order), rng.uniform(0.0, 0.06), rng.uniform(0.0, 2.0 * np.pi)) for order in (2, 3, 4)
    )

    def inner(reach: float, radius: tuple[float, float], hu: float, aspect: float = 1.4) -> _Blob:
        angle, dist = rng.uniform(0.0, 2.0 * np.pi), rng.uniform(0.0, reach)
        r = rng.uniform(*radius) * size * zoom
        return _Blob(cx + np.cos(angle) * dist * ax, cy + np.sin(angle) * dist * ay,
                     r * rng.uniform(1.0, aspect), r * rng.uniform(1.0, aspect), hu)

    # Nothing normal is a disc as dense as a lesion (125-155 HU): organs stay below 70 HU,
    # and the only bone is the spine.
    blobs = [inner(0.5, (0.08, 0.2), rng.uniform(-20.0, 70.0), 1.8)  # liver, spleen, kidney
             for _ in range(rng.integers(0, 4))]
    spine_r = rng.uniform(0.05, 0.09) * size * zoom
    return _Anatomy(
        body=_Blob(cx, cy, ax, ay, rng.uniform(20.0, 60.0)),
        outline=outline,
        tissue_level=rng.uniform(0.55, 0.92),
        fat_hu=rng.uniform(-120.0, -80.0),
        spine=_Blob(cx, cy + rng.uniform(0.5, 0.7) * ay, spine_r, spine_r * rng.uniform(0.8, 1.2),
                    rng.uniform(400.0, 1000.0)) if rng.random() < 0.8 else None,
        inside=tuple(blobs),
        noise_hu=rng.uniform(4.0, 18.0),
        smooth=bool(rng.random() < 0.5),
        lesion_hu=rng.uniform(125.0, 155.0),
        stored_window=[(40.0, 400.0), (50.0, 350.0), (-600.0, 1500.0), (400.0, 1800.0)][
            int(rng.integers(0, 4))],
        signed=bool(rng.random() < 0.5),
    )


def _smoothed(image: np.ndarray) -> np.ndarray:
    """A 3x3 box blur: scanner noise is correlated, not independent per pixel."""
    padded = np.pad(image, 1, mode="edge")
    rows, cols = image.shape
    return sum(padded[i:i + rows, j:j + cols] for i in range(3) for j in range(3)) / 9.0


def _slice_hu(
    rng: np.random.Generator, rows: int, cols: int, anatomy: _Anatomy, disc: float,
    lesion: _Lesion | None,
) -> np.ndarray:
    """One axial slice in HU: air, a fat-rimmed soft-tissue body and what is in it, maybe a
    lesion, and noise."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    body = anatomy.body
    dx, dy = (xx - body.x) / body.ax, (yy - body.y) / body.ay
    ellipse = dx**2 + dy**2
    if anatomy.outline:
        theta = np.arctan2(dy, dx)
        wobble = 1.0 + sum(a * np.cos(k * theta + phase) for k, a, phase in anatomy.outline)
        ellipse = ellipse / wobble**2
    image = np.full((rows, cols), AIR_HU, dtype=np.float32)
    image[ellipse <= 1.0] = anatomy.fat_hu
    tissue = ellipse <= anatomy.tissue_level
    image[tissue] = body.hu
    for blob in anatomy.inside:
        image[blob.mask(xx, yy) & tissue] = blob.hu
    if anatomy.spine is not None:
        image[anatomy.spine.mask(xx, yy)] = anatomy.spine.hu
    if lesion is not None and disc > 0.0:
        image[(xx - lesion.x) ** 2 + (yy - lesion.y) ** 2 <= disc * disc] = anatomy.lesion_hu
    noise = rng.normal(0.0, anatomy.noise_hu, size=image.shape).astype(np.float32)
    return image + (_smoothed(noise) * 1.5 if anatomy.smooth else noise)


def _uid(*parts: object) -> str:
    """A reproducible UID from the given parts: a name-based (v5) UUID under the 2.25 root."""
    name = "/".join(str(part) for part in parts)
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _dataset(
    hu: np.ndarray, index: int, spacing: tuple[float, float], uids: dict[str, str],
    patient_id: str, anatomy: _Anatomy,
) -> Dataset:
    """A CT Image Storage dataset for one slice (12-bit unsigned or 16-bit signed, in HU)."""
    rows, cols = hu.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uids["sop"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uids["sop"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PatientName, ds.PatientID = f"DEMO^{patient_id}", patient_id
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
    ds.Modality, ds.Manufacturer, ds.BodyPartExamined = "CT", "pacs-ai demo phantom", "ABDOMEN"
    ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = 1, index + 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PositionReferenceIndicator = ""
    ds.KVP = "120"
    ds.SliceThickness = f"{spacing[0]:g}"
    ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[1]:g}"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    z = index * spacing[0]
    corner = (-cols * spacing[1] / 2, -rows * spacing[1] / 2)
    ds.ImagePositionPatient = [f"{corner[0]:g}", f"{corner[1]:g}", f"{z:g}"]
    ds.SliceLocation = f"{z:g}"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.RescaleSlope, ds.RescaleType = "1", "HU"
    if anatomy.signed:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept = "0"
        stored = np.clip(np.rint(hu), -2048, 3071).astype(np.int16)
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept = f"{INTERCEPT:g}"
        stored = np.clip(np.rint(hu - INTERCEPT), 0, 4095).astype(np.uint16)
    ds.WindowCenter, ds.WindowWidth = (f"{v:g}" for v in anatomy.stored_window)
    ds.PixelData = stored.tobytes()
    return ds


def synthesize_series(
    out_dir: Path,
    *,
    slices: int = 16,
    rows: int = 128,
    cols: int = 128,
    lesion: bool = False,
    seed: int = 0,
    patient_id: str = "DEMO-0000",
    study_uid: str | None = None,
    series_uid: str | None = None,
    slice_spacing_mm: float = 5.0,
    varied: bool = False,
) -> SyntheticSeries:
    """Write one phantom CT series (one file per slice) and return it with its ground truth.

    `varied` draws the background at random (`_varied_anatomy`) instead of the plain one,
    from streams of their own that leave out `lesion`: a varied series with a lesion and one
    without from the same seed differ in the lesion's pixels only (and in their UIDs).
    """
    if slices < 1 or rows < 8 or cols < 8:
        raise ValueError("a phantom needs at least 1 slice of 8x8 pixels")
    rng = np.random.default_rng([seed, slices, rows, cols, int(lesion)])
    plan = _plan_lesion(rng, slices, rows, cols) if lesion else None
    anatomy = _plain_anatomy(rng, rows, cols)
    if varied:  # other streams, so a plain series stays what it always was
        anatomy = _varied_anatomy(np.random.default_rng([seed, slices, rows, cols, 1]), rows, cols)
        rng = np.random.default_rng([seed, slices, rows, cols, 2])
    pixel_mm = 350.0 / max(rows, cols)
    study = study_uid or _uid("study", patient_id, seed)
    series = series_uid or _uid("series", patient_id, seed, lesion)
    frame = _uid("frame", series)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    sop_uids: list[str] = []
    for index in range(slices):
        disc = plan.radius_on(index) if plan else 0.0
        hu = _slice_hu(rng, rows, cols, anatomy, disc, plan)
        uids = {"sop": _uid("sop", series, index), "study": study, "series": series,
                "frame": frame}
        path = out_dir / f"slice-{index + 1:04d}.dcm"
        _dataset(hu, index, (slice_spacing_mm, pixel_mm), uids, patient_id, anatomy).save_as(
            path, enforce_file_format=True
        )
        paths.append(path)
        sop_uids.append(uids["sop"])
    truth = frozenset(range(plan.first, plan.first + plan.count)) if plan else frozenset()
    return SyntheticSeries(tuple(paths), tuple(sop_uids), truth, patient_id, study, series)


def write_series(
    out_dir: Path,
    *,
    slices: int = 16,
    rows: int = 128,
    cols: int = 128,
    lesion: bool = False,
    seed: int = 0,
    patient_id: str = "DEMO-0000",
    study_uid: str | None = None,
    series_uid: str | None = None,
    varied: bool = False,
) -> list[Path]:
    """Write one phantom CT series and return its files in slice order."""
    written = synthesize_series(
        out_dir, slices=slices, rows=rows, cols=cols, lesion=lesion, seed=seed,
        patient_id=patient_id, study_uid=study_uid, series_uid=series_uid, varied=varied,
    )
    return list(written.paths)
