"""Small source studies (headers only) and findings that the report tests build SRs from."""

from __future__ import annotations

from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import CTImageStorage, generate_uid

from daemon.report import CodeSpec, DeviceInfo, Evidence, Finding

SITE_SCHEME = "99PACSAI"
NODULE = CodeSpec(SITE_SCHEME, "NOD", "Lung nodule", scheme_name="pacs-ai site findings")
HAEMORRHAGE = CodeSpec("SCT", "50960005", "Hemorrhage")
WEIGHTS = "ab" * 32
DEVICE = DeviceInfo(
    ae_title="PACSAI", software_version="0.1.0", device_uid="2.25.1234567890123456789"
)


def ct_series(
    count: int = 3,
    *,
    study_uid: str | None = None,
    patient_weight: str | None = "0",
) -> list[Dataset]:
    """CT Image Storage headers of one series, ordered along z; weight 0 like some scanners."""
    study_uid = study_uid or generate_uid()
    series = generate_uid()
    frame_of_reference = generate_uid()
    headers = []
    for index in range(count):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PatientName = "Test^Patient"
        ds.PatientID = "PID-1"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "F"
        if patient_weight is not None:
            ds.PatientWeight = patient_weight
        ds.AccessionNumber = "ACC-1"
        ds.StudyID = "1"
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.ReferringPhysicianName = ""
        ds.Modality = "CT"
        ds.SeriesNumber = 2
        ds.InstanceNumber = index + 1
        ds.Rows = 512
        ds.Columns = 512
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = "1.25"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-180, -180, -100 + 1.25 * index]
        headers.append(ds)
    return headers


def ct_small() -> Dataset:
    """pydicom's CT_small.dcm header: a real scanner's attributes, oddities included."""
    return dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)


def image_finding(
    source: Dataset, *, clinical_use: bool = True, probability: float = 0.87
) -> Finding:
    """A CNN result on one image."""
    return Finding(
        model_name="chest-cnn",
        model_version="1.2.0",
        weights_sha256=WEIGHTS,
        level="image",
        finding=NODULE,
        probability=probability,
        threshold=0.5,
        evidence=(Evidence(str(source.SOPClassUID), str(source.SOPInstanceUID)),),
        clinical_use=clinical_use,
    )


def series_finding(
    sources: list[Dataset], *, clinical_use: bool = True, probability: float = 0.31
) -> Finding:
    """An LSTM result over the ordered slices of a series."""
    return Finding(
        model_name="head-lstm",
        model_version="0.9.1",
        weights_sha256="cd" * 32,
        level="series",
        finding=HAEMORRHAGE,
        probability=probability,
        threshold=0.4,
        evidence=tuple(Evidence(str(s.SOPClassUID), str(s.SOPInstanceUID)) for s in sources),
        clinical_use=clinical_use,
    )
