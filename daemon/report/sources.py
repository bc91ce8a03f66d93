"""What the report takes from the source headers, cleaned so that the SR stays valid."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from copy import deepcopy

from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes

# Attributes whose zero value is invalid in an SR's Patient Study module.
_POSITIVE_NUMBERS = ("PatientWeight", "PatientSize")
# Type 2 attributes that highdicom reads from the first source and that must exist.
_TYPE2_PATIENT_STUDY = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_PATIENT_SEX = ("M", "F", "O")

# Coding schemes of PS3.16 Table 8-1 that need no Coding Scheme Identification item.
STANDARD_SCHEMES = frozenset(
    {
        "DCM",
        "SCT",
        "SRT",
        "LN",
        "UCUM",
        "RADLEX",
        "NCIt",
        "UMLS",
        "FMA",
        "RFC5646",
        "ACR",
        "MSH",
        "ICD10",
        "I10",
        "I9C",
        "NEU",
        "BARI",
        "NICIP",
        "UBERON",
        "MDC",
        "NDC",
        "RXNORM",
    }
)

_PROCEDURE_BY_MODALITY = {
    "CT": codes.cid100.CTUnspecifiedBodyRegion,
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,
    "PT": codes.cid100.PETUnspecifiedBodyRegion,
    "NM": codes.cid100.NMUnspecifiedBodyRegion,
    "CR": codes.cid100.XRUnspecifiedBodyRegion,
    "DX": codes.cid100.XRUnspecifiedBodyRegion,
}
_CROSS_SECTIONAL = ("CT", "MR", "PT")
# Image storage classes that highdicom 0.28 can put into an Image Library.
_LIBRARY_SOP_CLASSES = frozenset(
    "1.2.840.10008.5.1.4.1.1." + suffix
    for suffix in (
        "1",
        "1.1",
        "1.1.1",
        "1.2",
        "1.2.1",
        "1.3",
        "1.3.1",
        "2",
        "2.1",
        "3.1",
        "4",
        "4.1",
        "6.1",
        "7",
        "7.1",
        "7.2",
        "7.3",
        "7.4",
        "12.1",
        "12.2",
    )
)
_PROJECTION = ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA")


def _has_value(ds: Dataset, keyword: str) -> bool:
    """An attribute that is present and not empty."""
    if keyword not in ds:
        return False
    value = ds[keyword].value
    if value is None:
        return False
    if isinstance(value, str | bytes | list | MultiValue | DicomSequence):
        return len(value) > 0
    return True


def clean_source(source: Dataset) -> Dataset:
    """Copy of a source header without the values that make an SR invalid (input untouched)."""
    ds = deepcopy(source)
    for keyword in _POSITIVE_NUMBERS:
        if keyword in ds and (not _has_value(ds, keyword) or float(ds[keyword].value) <= 0):
            del ds[keyword]
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in ds:
            setattr(ds, keyword, None)
    if ds.PatientSex not in _PATIENT_SEX:
        ds.PatientSex = None
    return ds


def check_same_study(sources: Sequence[Dataset]) -> str:
    """The one Study Instance UID the report belongs to, or a clear refusal."""
    if not sources:
        raise ValueError("an SR needs at least one source instance of the study")
    study_uids = {str(ds.StudyInstanceUID) for ds in sources}
    if len(study_uids) != 1:
        raise ValueError(f"sources span several studies: {sorted(study_uids)}")
    return study_uids.pop()


def library_ready(ds: Dataset) -> bool:
    """Whether highdicom can describe this instance in the Image Library (TID 1601-1604).

    Instances that are not plain images, or lack the geometry the descriptors need (for
    example enhanced multi-frame headers with geometry only in functional groups), stay out
    of the library; they are still referenced from their group and the evidence.
    """
    if str(ds.SOPClassUID) not in _LIBRARY_SOP_CLASSES or not _has_value(ds, "Modality"):
        return False
    needed: tuple[str, ...] = ("Rows", "Columns")
    if ds.Modality in _CROSS_SECTIONAL:
        needed += ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient")
        needed += ("SliceThickness",)
    elif ds.Modality in _PROJECTION:
        needed += ("PatientOrientation", "ImagerPixelSpacing")
    return all(_has_value(ds, k) for k in needed)


def procedure_reported(source: Dataset) -> CodedConcept:
    """Procedure Reported: the study's own standard-coded procedure, else one by modality."""
    for item in source.get("ProcedureCodeSequence", []):
        if (
            item.get("CodingSchemeDesignator") in STANDARD_SCHEMES
            and _has_value(item, "CodeValue")
            and _has_value(item, "CodeMeaning")
            and len(str(item.CodeMeaning)) <= 64
        ):
            return CodedConcept(
                value=str(item.CodeValue),
                scheme_designator=str(item.CodingSchemeDesignator),
                meaning=str(item.CodeMeaning),
            )
    code = _PROCEDURE_BY_MODALITY.get(
        str(source.get("Modality", "")), codes.cid100.ImagingProcedure
    )
    return CodedConcept.from_code(code)


def scheme_designators(ds: Dataset) -> Iterator[str]:
    """Every Coding Scheme Designator in a dataset, nested sequences included."""
    for element in ds:
        if element.keyword == "CodingSchemeDesignator" and element.value:
            yield str(element.value)
        elif element.VR == "SQ":
            for item in element.value:
                yield from scheme_designators(item)
