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


def _slice_hu(
    rng: np.random.Generator, rows: int, cols: int, body: tuple[float, float], disc: float,
    lesion: _Lesion | None,
) -> np.ndarray:
    """One axial slice in HU: air, a fat-rimmed soft-tissue ellipse, a spine, maybe a lesion."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cx, cy = cols / 2.0, rows / 2.0
    ax, ay = body
    ellipse = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2
    image = np.full((rows, cols), AIR_HU, dtype=np.float32)
    image[ellipse <= 1.0] = FAT_HU
    image[ellipse <= 0.85] = TISSUE_HU
    spine = (xx - cx) ** 2 + (yy - (cy + 0.6 * ay)) ** 2 <= (0.07 * min(rows, cols)) ** 2
    image[spine] = BONE_HU
    if lesion is not None and disc > 0.0:
        image[(xx - lesion.x) ** 2 + (yy - lesion.y) ** 2 <= disc * disc] = LESION_HU
    image += rng.normal(0.0, 12.0, size=image.shape).astype(np.float32)
    return image


def _uid(*parts: object) -> str:
    """A reproducible UID from the given parts: a name-based (v5) UUID under the 2.25 root."""
    name = "/".join(str(part) for part in parts)
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _dataset(
    hu: np.ndarray, index: int, spacing: tuple[float, float], uids: dict[str, str],
    patient_id: str,
) -> Dataset:
    """A CT Image Storage dataset for one slice (12-bit unsigned, rescaled to HU)."""
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
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = f"{INTERCEPT:g}", "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    stored = np.clip(np.rint(hu - INTERCEPT), 0, 4095).astype(np.uint16)
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
) -> SyntheticSeries:
    """Write one phantom CT series (one file per slice) and return it with its ground truth."""
    if slices < 1 or rows < 8 or cols < 8:
        raise ValueError("a phantom needs at least 1 slice of 8x8 pixels")
    rng = np.random.default_rng([seed, slices, rows, cols, int(lesion)])
    plan = _plan_lesion(rng, slices, rows, cols) if lesion else None
    body = (cols * rng.uniform(0.36, 0.44), rows * rng.uniform(0.26, 0.34))
    pixel_mm = 350.0 / max(rows, cols)
    study = study_uid or _uid("study", patient_id, seed)
    series = series_uid or _uid("series", patient_id, seed, lesion)
    frame = _uid("frame", series)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    sop_uids: list[str] = []
    for index in range(slices):
        disc = plan.radius_on(index) if plan else 0.0
        hu = _slice_hu(rng, rows, cols, body, disc, plan)
        uids = {"sop": _uid("sop", series, index), "study": study, "series": series,
                "frame": frame}
        path = out_dir / f"slice-{index + 1:04d}.dcm"
        _dataset(hu, index, (slice_spacing_mm, pixel_mm), uids, patient_id).save_as(
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
) -> list[Path]:
    """Write one phantom CT series and return its files in slice order."""
    written = synthesize_series(
        out_dir, slices=slices, rows=rows, cols=cols, lesion=lesion, seed=seed,
        patient_id=patient_id, study_uid=study_uid, series_uid=series_uid,
    )
    return list(written.paths)
