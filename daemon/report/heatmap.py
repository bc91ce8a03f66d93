"""Explainability heatmaps as Secondary Capture images in the study, built with highdicom.

A PACS shows a Secondary Capture next to the source image without any AI-aware viewer, so
the overlay (source image with the class-activation map blended on top) travels as one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from highdicom import ContributingEquipment
from highdicom.sc import SCImage
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from daemon.report.inputs import CodeSpec, DeviceInfo, Evidence, model_key
from daemon.report.sources import clean_source
from daemon.report.uids import hashed_uid, model_device_uid

HEATMAP_SOP_CLASS = SecondaryCaptureImageStorage
HEATMAP_METHOD = "Grad-CAM"
SERIES_DESCRIPTION = "AI heatmap"
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"
DEVICE_MODEL_NAME = "pacs-ai"

_SERIES_NAMESPACE = "pacs-ai/heatmap-series/v1"
_INSTANCE_NAMESPACE = "pacs-ai/heatmap/v1"
_LO_MAX = 64
# Patient direction letters (PS3.3 C.7.6.1.1.1) of +x, +y, +z in the patient (LPS) system.
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))
_DIRECTIONS = frozenset("LRAPHF")


def heatmap_series_uid(study_uid: str, model: str) -> str:
    """Series Instance UID of one exact model's heatmaps in a study (series attributes such as
    the description name the model, so each model gets its own series)."""
    return hashed_uid([_SERIES_NAMESPACE, study_uid, model])


def heatmap_uid(
    study_uid: str,
    study_version: int,
    model: str,
    source_sop_instance_uid: str,
    frame_number: int | None,
    finding: CodeSpec,
) -> str:
    """SOP Instance UID of one heatmap, the same on every re-send of that study version."""
    if study_version < 0:
        raise ValueError(f"study_version must not be negative, got {study_version}")
    return hashed_uid(
        [
            _INSTANCE_NAMESPACE,
            study_uid,
            str(study_version),
            model,
            source_sop_instance_uid,
            str(frame_number or 0),
            f"{finding.scheme}:{finding.value}",
        ]
    )


def heatmap_evidence(sc: Dataset) -> Evidence:
    """The reference a `Finding.heatmaps` entry needs, taken from a built heatmap."""
    return Evidence(str(sc.SOPClassUID), str(sc.SOPInstanceUID))


def _series_description(model_name: str, model_version: str, clinical_use: bool) -> str:
    """What a PACS series list shows: the model, and the warning that must never be cut."""
    suffix = "" if clinical_use else f" - {NOT_FOR_CLINICAL_USE}"
    head = f"{SERIES_DESCRIPTION} {model_name} {model_version}"
    return head[: _LO_MAX - len(suffix)].rstrip() + suffix


def _image_comments(
    model_name: str, model_version: str, weights_sha256: str, finding: CodeSpec,
    clinical_use: bool,
) -> str:
    """The sentence a reader sees with the image: what it shows, by which exact model."""
    warning = f"{NOT_FOR_CLINICAL_USE}. " if not clinical_use else ""
    return (
        f"{warning}{HEATMAP_METHOD} class-activation map of '{finding.meaning}' "
        f"({finding.scheme} {finding.value}) by AI model {model_name} {model_version} "
        f"(weights sha256 {weights_sha256}), overlaid on the source image. "
        "It shows where the model looked, not the extent of a finding."
    )


def _direction(cosines: Sequence[float]) -> str:
    """The patient direction letter of the axis a direction vector mostly follows."""
    axis = int(np.argmax(np.abs(cosines)))
    positive, negative = _AXIS_LETTERS[axis]
    return positive if float(cosines[axis]) >= 0 else negative


def patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """(row, column) directions of the source image, so the capture keeps its orientation;
    None where the source says nothing usable."""
    given = [str(v) for v in source.get("PatientOrientation") or []]
    if len(given) == 2 and all(len(v) == 1 and v in _DIRECTIONS for v in given):
        return given[0], given[1]
    cosines = source.get("ImageOrientationPatient")
    if cosines is not None and len(cosines) == 6:
        values = [float(v) for v in cosines]
        if any(values[:3]) and any(values[3:]):
            return _direction(values[:3]), _direction(values[3:])
    return None


def _copy_anatomy(source: Dataset, sc: Dataset) -> None:
    """Body part and laterality of the source, so hanging protocols place the capture.

    One heatmap series holds captures of many sources, so a known laterality goes into the
    image-level Image Laterality. Without one, series Laterality (Type 2C) is left out when
    the body part is known (the source had none to give) and is present but empty, meaning
    unknown, when the body part is unknown too; never guessed.
    """
    body_part = source.get("BodyPartExamined")
    if body_part:
        sc.BodyPartExamined = body_part
    laterality = source.get("ImageLaterality") or source.get("Laterality")
    if laterality:
        sc.ImageLaterality = laterality
    elif not body_part:
        sc.Laterality = None


def _source_reference(source: Dataset, frame_number: int | None) -> Dataset:
    """Source Image Sequence item: the image this capture was computed from, and why."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame_number is not None:
        item.ReferencedFrameNumber = frame_number
    purpose = Dataset()
    code = codes.DCM.SourceImageForImageProcessingOperation
    purpose.CodeValue, purpose.CodingSchemeDesignator = code.value, code.scheme_designator
    purpose.CodeMeaning = code.meaning
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item


def _model_equipment(
    model_name: str, model_version: str, weights_sha256: str, device: DeviceInfo
) -> ContributingEquipment:
    """IHE AIR: the model as Processing Equipment, as in the SR, so a PACS knows the source."""
    item = ContributingEquipment(
        manufacturer=device.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model_name,
        software_versions=model_version,
        contribution_description=(
            f"AI model {model_name} {model_version}, weights sha256 {weights_sha256}; "
            f"{HEATMAP_METHOD} heatmap"
        ),
    )
    item.DeviceUID = model_device_uid(model_key(model_name, model_version, weights_sha256))
    return item


def _check_overlay(source: Dataset, overlay: np.ndarray) -> None:
    """Refuse an overlay that cannot line up with its source image pixel for pixel."""
    if overlay.dtype != np.uint8 or overlay.ndim != 3 or overlay.shape[2] != 3:
        raise ValueError(f"overlay must be uint8 (rows, columns, 3), got {overlay.dtype} "
                         f"{overlay.shape}")
    expected = (int(source.Rows), int(source.Columns))
    if overlay.shape[:2] != expected:
        raise ValueError(f"overlay is {overlay.shape[:2]}, the source image is {expected}")


def build_heatmap_sc(
    source: Dataset,
    overlay: np.ndarray,
    *,
    model_name: str,
    model_version: str,
    weights_sha256: str,
    finding: CodeSpec,
    study_version: int,
    clinical_use: bool,
    device: DeviceInfo,
    series_number: int,
    instance_number: int,
    frame_number: int | None = None,
) -> Dataset:
    """Build the Secondary Capture of one explainability overlay in the source's study.

    Parameters
    ----------
    source
        Header of the image the heatmap explains (pixel data not needed); its patient and
        study modules are copied.
    overlay
        uint8 (Rows, Columns, 3) RGB at the source's resolution, e.g.
        ``models.gradcam.heatmap_overlay``.
    model_name, model_version, weights_sha256
        The exact model, named in the series description, Image Comments and Contributing
        Equipment (IHE AIR).
    finding
        The class the map explains; part of the SOP Instance UID.
    study_version
        Version of the study analysed; a new version makes new instances.
    clinical_use
        The manifest's flag; when false the capture says NOT FOR CLINICAL USE in its series
        description and Image Comments, and its Content Qualification is RESEARCH.
    frame_number
        1-based frame of a multi-frame source, None for a single-frame one.

    Returns
    -------
    pydicom.Dataset
        A highdicom ``SCImage``: new series per study and model (:func:`heatmap_series_uid`),
        UID from :func:`heatmap_uid`, ImageType DERIVED\\SECONDARY, referencing its source.
    """
    _check_overlay(source, overlay)
    if frame_number is not None and frame_number < 1:
        raise ValueError(f"frame numbers start at 1, got {frame_number}")
    study_uid = str(source.StudyInstanceUID)
    key = model_key(model_name, model_version, weights_sha256)
    orientation = patient_orientation(source)
    spacing = source.get("PixelSpacing")
    sc = SCImage.from_ref_dataset(
        clean_source(source),
        pixel_array=np.ascontiguousarray(overlay),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=heatmap_series_uid(study_uid, key),
        series_number=series_number,
        sop_instance_uid=heatmap_uid(
            study_uid, study_version, key, str(source.SOPInstanceUID), frame_number, finding
        ),
        instance_number=instance_number,
        manufacturer=device.manufacturer,
        # highdicom insists on an orientation; an unknown one is blanked below (Type 2).
        patient_orientation=orientation or ("L", "P"),
        pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[
            _model_equipment(model_name, model_version, weights_sha256, device)
        ],
        manufacturer_model_name=DEVICE_MODEL_NAME,
        software_versions=device.software_version,
        series_description=_series_description(model_name, model_version, clinical_use),
        content_qualification=None if clinical_use else "RESEARCH",
    )
    if orientation is None:
        sc.PatientOrientation = None
    sc.ImageType = ["DERIVED", "SECONDARY"]
    _copy_anatomy(source, sc)
    sc.BurnedInAnnotation = "NO"
    sc.DerivationDescription = (
        f"{HEATMAP_METHOD} class-activation map of {finding.meaning} by "
        f"{model_name} {model_version}, blended over the windowed source image"
    )[:1024]
    sc.SourceImageSequence = [_source_reference(source, frame_number)]
    sc.ImageComments = _image_comments(
        model_name, model_version, weights_sha256, finding, clinical_use
    )
    return sc

