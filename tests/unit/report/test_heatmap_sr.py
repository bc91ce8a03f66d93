"""The SR points from each finding to its heatmaps, read back the way a consumer reads it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from highdicom.sr import srread
from highdicom.sr.utils import find_content_items
from pydicom import Dataset
from pydicom.sr.codedict import codes

from daemon.report import (
    Evidence,
    Finding,
    build_heatmap_sc,
    build_sr,
    heatmap_evidence,
    series_uid,
    sr_uid,
    write_dataset,
)
from tests.unit.report.studies import DEVICE, ct_series, image_finding, series_finding

VISUAL_EXPLANATION = codes.DCM.VisualExplanation
MEASUREMENT_GROUP = codes.DCM.MeasurementGroup


def _capture(source: Dataset, finding: Finding, number: int = 1) -> Dataset:
    """The heatmap of one finding on one source image."""
    return build_heatmap_sc(
        source,
        np.zeros((int(source.Rows), int(source.Columns), 3), np.uint8),
        model_name=finding.model_name,
        model_version=finding.model_version,
        weights_sha256=finding.weights_sha256,
        finding=finding.finding,
        study_version=1,
        clinical_use=finding.clinical_use,
        device=DEVICE,
        series_number=7702,
        instance_number=number,
    )


def _sr(study: list[Dataset], findings: list[Finding], heatmaps: list[Dataset]) -> Dataset:
    """build_sr with the UIDs the daemon would derive."""
    uid = str(study[0].StudyInstanceUID)
    return build_sr(
        study,
        findings,
        sop_instance_uid=sr_uid(uid, 1, [f.model_key for f in findings]),
        series_instance_uid=series_uid(uid),
        series_number=9001,
        instance_number=1,
        device=DEVICE,
        heatmap_images=heatmaps,
    )


def _groups(ds: Dataset) -> list[Dataset]:
    """Every TID 1501 measurement group container."""
    return find_content_items(ds, name=MEASUREMENT_GROUP, recursive=True)


def _explanations(group: Dataset) -> list[str]:
    """SOP Instance UIDs of the group's "Visual explanation" images."""
    return [
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in find_content_items(group, name=VISUAL_EXPLANATION)
    ]


@pytest.fixture
def study() -> list[Dataset]:
    """Three CT slices of one series."""
    return ct_series(3)


def test_finding_group_references_its_heatmaps_as_visual_explanations(study, tmp_path):
    plain = image_finding(study[1], clinical_use=False)
    captures = [_capture(study[1], plain, 1), _capture(study[2], plain, 2)]
    finding = dataclasses.replace(plain, heatmaps=tuple(map(heatmap_evidence, captures)))
    other = series_finding(study)

    path = write_dataset(_sr(study, [finding, other], captures), tmp_path / "sr.dcm")
    sr = srread(path)

    by_tracking = {
        str(find_content_items(g, name=codes.DCM.TrackingUniqueIdentifier)[0].UID): g
        for g in _groups(sr)
    }
    assert _explanations(by_tracking[finding.tracking_uid]) == [
        str(c.SOPInstanceUID) for c in captures
    ]
    assert _explanations(by_tracking[other.tracking_uid]) == []


def test_heatmaps_are_listed_as_evidence_of_the_same_study(study):
    plain = image_finding(study[0])
    capture = _capture(study[0], plain)
    finding = dataclasses.replace(plain, heatmaps=(heatmap_evidence(capture),))

    sr = _sr(study, [finding], [capture])

    referenced = {
        str(ref.ReferencedSOPInstanceUID): str(ref.ReferencedSOPClassUID)
        for item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert referenced[str(capture.SOPInstanceUID)] == str(capture.SOPClassUID)


def test_heatmaps_stay_out_of_the_image_library(study):
    plain = image_finding(study[0])
    capture = _capture(study[0], plain)
    finding = dataclasses.replace(plain, heatmaps=(heatmap_evidence(capture),))

    sr = _sr(study, [finding], [capture])

    library = find_content_items(sr, name=codes.DCM.ImageLibrary, recursive=True)[0]
    entries = find_content_items(library, name=codes.SCT.Source, recursive=True)
    uids = {str(e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for e in entries}
    assert str(capture.SOPInstanceUID) not in uids
    assert str(study[0].SOPInstanceUID) in uids


def test_heatmaps_do_not_change_the_tracking_uid(study):
    plain = image_finding(study[0])
    capture = _capture(study[0], plain)

    with_heatmap = dataclasses.replace(plain, heatmaps=(heatmap_evidence(capture),))

    assert with_heatmap.tracking_uid == plain.tracking_uid


def test_a_heatmap_the_sr_was_not_given_is_refused(study):
    plain = image_finding(study[0])
    capture = _capture(study[0], plain)
    finding = dataclasses.replace(plain, heatmaps=(heatmap_evidence(capture),))

    with pytest.raises(ValueError, match="heatmaps not in heatmap_images"):
        _sr(study, [finding], [])


def test_a_heatmap_from_another_study_is_refused(study):
    plain = image_finding(study[0])
    elsewhere = ct_series(1)[0]
    capture = _capture(elsewhere, plain)
    finding = dataclasses.replace(plain, heatmaps=(heatmap_evidence(capture),))

    with pytest.raises(ValueError, match="several studies"):
        _sr(study, [finding], [capture])


def test_a_heatmap_named_twice_is_refused(study):
    evidence = Evidence("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4")

    with pytest.raises(ValueError, match="referenced twice"):
        dataclasses.replace(image_finding(study[0]), heatmaps=(evidence, evidence))


def test_sr_without_heatmaps_has_no_visual_explanation(study):
    sr = _sr(study, [image_finding(study[0])], [])

    assert find_content_items(sr, name=VISUAL_EXPLANATION, recursive=True) == []
