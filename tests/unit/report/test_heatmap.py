"""The heatmap Secondary Capture: same study, its own series, deterministic UIDs, its source
referenced, the model named, and research models marked as not for clinical use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import SecondaryCaptureImageStorage

from daemon.report import (
    HEATMAP_SOP_CLASS,
    CodeSpec,
    build_heatmap_sc,
    heatmap_evidence,
    heatmap_series_uid,
    heatmap_uid,
    model_device_uid,
    model_key,
    write_dataset,
)
from daemon.report.heatmap import NOT_FOR_CLINICAL_USE, patient_orientation
from tests.unit.report.studies import DEVICE, NODULE, WEIGHTS, ct_series, ct_small

KEY = model_key("chest-cnn", "1.2.0", WEIGHTS)


def _overlay(source: Dataset, seed: int = 0) -> np.ndarray:
    """A random RGB overlay of the source's size."""
    shape = (int(source.Rows), int(source.Columns), 3)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _build(source: Dataset, **overrides: object) -> Dataset:
    """build_heatmap_sc with a research model's defaults."""
    kwargs: dict[str, object] = {
        "model_name": "chest-cnn",
        "model_version": "1.2.0",
        "weights_sha256": WEIGHTS,
        "finding": NODULE,
        "study_version": 1,
        "clinical_use": False,
        "device": DEVICE,
        "series_number": 7702,
        "instance_number": 1,
    }
    overlay = overrides.pop("overlay", None)
    kwargs.update(overrides)
    return build_heatmap_sc(
        source, _overlay(source) if overlay is None else overlay, **kwargs  # type: ignore[arg-type]
    )


@pytest.fixture
def source() -> Dataset:
    """One CT slice header."""
    return ct_series(1)[0]


def test_capture_is_rgb_secondary_capture_in_the_source_study_and_a_new_series(source):
    sc = _build(source)

    assert sc.SOPClassUID == SecondaryCaptureImageStorage == HEATMAP_SOP_CLASS
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID == heatmap_series_uid(str(source.StudyInstanceUID), KEY)
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.PatientID == "PID-1" and sc.PatientName == "Test^Patient"
    assert sc.AccessionNumber == "ACC-1"
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert (sc.Rows, sc.Columns) == (source.Rows, source.Columns)
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]


def test_uids_are_the_same_on_every_build(source):
    first, second = _build(source), _build(source, overlay=_overlay(source, seed=9))

    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert first.SOPInstanceUID == heatmap_uid(
        str(source.StudyInstanceUID), 1, KEY, str(source.SOPInstanceUID), None, NODULE
    )


@pytest.mark.parametrize(
    "change",
    [
        {"study_version": 2},
        {"finding": CodeSpec("99PACSAI", "OTHER", "Other finding")},
        {"model_version": "1.3.0"},
        {"weights_sha256": "ef" * 32},
        {"frame_number": 2},
    ],
)
def test_each_input_of_the_uid_makes_another_instance(source, change):
    assert _build(source, **change).SOPInstanceUID != _build(source).SOPInstanceUID


def test_another_source_image_makes_another_instance_in_the_same_series():
    first, second = ct_series(2)
    second.StudyInstanceUID = first.StudyInstanceUID

    a, b = _build(first), _build(second)

    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert a.SeriesInstanceUID == b.SeriesInstanceUID


def test_source_image_is_referenced_for_the_processing_operation(source):
    sc = _build(source, frame_number=3)

    (item,) = sc.SourceImageSequence
    assert item.ReferencedSOPClassUID == source.SOPClassUID
    assert item.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert item.ReferencedFrameNumber == 3
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121322", "DCM")


def test_single_frame_source_is_referenced_without_frame(source):
    (item,) = _build(source).SourceImageSequence

    assert "ReferencedFrameNumber" not in item


def test_research_model_is_marked_not_for_clinical_use(source):
    sc = _build(source, clinical_use=False)

    assert "chest-cnn" in sc.SeriesDescription
    assert sc.SeriesDescription.endswith(NOT_FOR_CLINICAL_USE)
    assert sc.ImageComments.startswith(NOT_FOR_CLINICAL_USE)
    assert sc.ContentQualification == "RESEARCH"


def test_clinical_model_carries_no_warning(source):
    sc = _build(source, clinical_use=True)

    assert NOT_FOR_CLINICAL_USE not in sc.SeriesDescription
    assert NOT_FOR_CLINICAL_USE not in sc.ImageComments
    assert "ContentQualification" not in sc


def test_long_model_name_never_cuts_the_warning(source):
    sc = _build(source, model_name="x" * 64, clinical_use=False)

    assert len(sc.SeriesDescription) <= 64
    assert sc.SeriesDescription.endswith(NOT_FOR_CLINICAL_USE)


def test_model_is_named_with_version_and_weights(source):
    sc = _build(source)

    assert f"chest-cnn 1.2.0 (weights sha256 {WEIGHTS})" in sc.ImageComments
    assert NODULE.meaning in sc.ImageComments
    model = [e for e in sc.ContributingEquipmentSequence if e.get("DeviceUID")]
    assert len(model) == 1
    assert model[0].ManufacturerModelName == "chest-cnn"
    assert model[0].SoftwareVersions == "1.2.0"
    assert model[0].DeviceUID == model_device_uid(KEY)
    assert model[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"


def test_the_daemon_is_the_manufacturer(source):
    sc = _build(source)

    assert sc.Manufacturer == DEVICE.manufacturer
    assert sc.ManufacturerModelName == "pacs-ai"
    assert sc.SoftwareVersions == DEVICE.software_version


def test_pixels_survive_the_file_unchanged(source, tmp_path: Path):
    overlay = _overlay(source, seed=4)

    path = write_dataset(_build(source, overlay=overlay), tmp_path / "sc.dcm")

    np.testing.assert_array_equal(dcmread(path).pixel_array, overlay)


def test_pixel_spacing_is_the_sources(source):
    assert [float(v) for v in _build(source).PixelSpacing] == [0.7, 0.7]


@pytest.mark.parametrize(
    "overlay",
    [np.zeros((512, 511, 3), np.uint8), np.zeros((512, 512), np.uint8),
     np.zeros((512, 512, 3), np.float32)],
)
def test_overlay_that_cannot_line_up_is_refused(source, overlay):
    with pytest.raises(ValueError, match="overlay"):
        _build(source, overlay=overlay)


def test_real_scanner_header_builds():
    source = ct_small()

    sc = _build(source)

    assert sc.PatientID == source.PatientID
    assert sc.StudyInstanceUID == source.StudyInstanceUID


def test_evidence_of_a_capture_names_its_class_and_instance(source):
    sc = _build(source)

    evidence = heatmap_evidence(sc)

    assert evidence.sop_class_uid == SecondaryCaptureImageStorage
    assert evidence.sop_instance_uid == sc.SOPInstanceUID


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [
        ([1, 0, 0, 0, 1, 0], ("L", "P")),
        ([0, 1, 0, 0, 0, -1], ("P", "F")),
        ([-0.9, 0.1, 0, 0, 0.2, -0.98], ("R", "F")),
    ],
)
def test_orientation_follows_the_source_axes(orientation, expected):
    ds = Dataset()
    ds.ImageOrientationPatient = orientation

    assert patient_orientation(ds) == expected


def test_projection_orientation_is_taken_as_given():
    ds = Dataset()
    ds.PatientOrientation = ["A", "F"]

    assert patient_orientation(ds) == ("A", "F")


def test_unknown_orientation_is_left_empty(source):
    del source.ImageOrientationPatient

    sc = _build(source)

    assert patient_orientation(source) is None
    assert "PatientOrientation" in sc and not sc.PatientOrientation


def test_known_laterality_goes_to_the_image(source):
    source.Laterality = "R"

    sc = _build(source)

    assert sc.ImageLaterality == "R"
    assert "Laterality" not in sc
