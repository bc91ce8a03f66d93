"""The SR builder's output, read back the way a consumer would (highdicom parsing)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from highdicom.sr import Comprehensive3DSR, EnhancedSR, srread
from highdicom.sr.utils import find_content_items
from pydicom import Dataset, dcmread
from pydicom.sr.codedict import codes
from pydicom.uid import EnhancedCTImageStorage, generate_uid

from daemon.report import (
    Evidence,
    Finding,
    SeriesFailure,
    build_no_applicable_model_sr,
    build_sr,
    hashed_uid,
    model_device_uid,
    series_uid,
    sr_uid,
    write_dataset,
)
from daemon.report.sr import NO_APPLICABLE_MODEL_TEXT, NOT_FOR_CLINICAL_USE
from tests.unit.report.studies import (
    DEVICE,
    NODULE,
    SITE_SCHEME,
    WEIGHTS,
    ct_series,
    ct_small,
    image_finding,
    series_finding,
)

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"


def _build(sources: list[Dataset], findings: list[Finding], **kwargs: object) -> Dataset:
    """build_sr with the UIDs the daemon would derive."""
    study = str(sources[0].StudyInstanceUID)
    variant = "enhanced" if kwargs.get("sop_class") == "enhanced" else ""
    defaults: dict[str, object] = {
        "sop_instance_uid": sr_uid(study, 1, [f.model_key for f in findings], variant),
        "series_instance_uid": series_uid(study),
        "series_number": 9001,
        "instance_number": 1,
        "device": DEVICE,
    }
    defaults.update(kwargs)
    return build_sr(sources, findings, **defaults)  # type: ignore[arg-type]


def _texts(ds: Dataset) -> list[str]:
    """Every TEXT "Comment" in the document."""
    items = find_content_items(ds, name=codes.DCM.Comment, recursive=True)
    return [str(item.TextValue) for item in items]


@pytest.fixture
def study() -> list[Dataset]:
    """Three CT slices of one series."""
    return ct_series(3)


def test_report_is_comprehensive_3d_sr_in_the_same_study_and_a_new_series(study):
    ds = _build(study, [image_finding(study[0])])

    assert ds.SOPClassUID == COMPREHENSIVE_3D_SR
    assert ds.Modality == "SR"
    assert ds.StudyInstanceUID == study[0].StudyInstanceUID
    assert ds.SeriesInstanceUID == series_uid(study[0].StudyInstanceUID)
    assert ds.SeriesInstanceUID != study[0].SeriesInstanceUID
    assert ds.PatientID == "PID-1"
    assert ds.PatientName == "Test^Patient"
    assert ds.AccessionNumber == "ACC-1"
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"


def test_enhanced_fallback_has_the_enhanced_sr_class_and_its_own_uid(study):
    findings = [image_finding(study[0])]
    comprehensive = _build(study, findings)
    enhanced = _build(study, findings, sop_class="enhanced")

    assert enhanced.SOPClassUID == ENHANCED_SR
    assert enhanced.SOPInstanceUID != comprehensive.SOPInstanceUID
    assert enhanced.SeriesInstanceUID == comprehensive.SeriesInstanceUID
    assert len(EnhancedSR.from_dataset(enhanced).content.get_image_measurement_groups()) == 1


def test_unknown_sop_class_is_refused(study):
    with pytest.raises(ValueError, match="sop_class"):
        _build(study, [image_finding(study[0])], sop_class="basic")


def test_sr_uid_depends_on_study_version_and_models_only():
    keys = ["a@1#x", "b@2#y"]
    uid = sr_uid("1.2.3", 4, keys)

    assert uid == sr_uid("1.2.3", 4, list(reversed(keys)))
    assert uid.startswith("2.25.") and len(uid) <= 64
    assert uid != sr_uid("1.2.3", 5, keys)
    assert uid != sr_uid("1.2.3", 4, keys[:1])
    assert uid != sr_uid("1.2.3", 4, keys, "enhanced")
    assert uid != sr_uid("1.2.4", 4, keys)
    assert series_uid("1.2.3") == series_uid("1.2.3") != series_uid("1.2.4")


def test_building_twice_gives_the_same_instance_and_tracking_uids(study):
    findings = [image_finding(study[0]), series_finding(study)]
    first = Comprehensive3DSR.from_dataset(_build(study, findings))
    second = Comprehensive3DSR.from_dataset(_build(study, findings))

    assert first.SOPInstanceUID == second.SOPInstanceUID
    first_uids = [g.tracking_uid for g in first.content.get_image_measurement_groups()]
    second_uids = [g.tracking_uid for g in second.content.get_image_measurement_groups()]
    assert first_uids == second_uids == [f.tracking_uid for f in findings]
    assert len(set(first_uids)) == 2


def test_one_measurement_group_per_finding_with_certainty_read_back(study):
    findings = [image_finding(study[0], probability=0.875), series_finding(study, probability=0.3)]
    sr = Comprehensive3DSR.from_dataset(_build(study, findings))

    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 2
    for group, finding in zip(groups, findings, strict=True):
        assert group.tracking_identifier == finding.tracking_id
        assert group.finding_type.value == finding.finding.value
        assert group.finding_type.scheme_designator == finding.finding.scheme
        (certainty,) = group.get_measurements(name=codes.DCM.CertaintyOfFinding)
        assert certainty.value == pytest.approx(finding.probability)
        assert certainty.unit.value == "1"
        assert certainty.unit.scheme_designator == "UCUM"


def test_image_finding_references_one_image_and_series_finding_the_ordered_slices(study):
    findings = [image_finding(study[1]), series_finding(study)]
    sr = Comprehensive3DSR.from_dataset(_build(study, findings))
    image_group, series_group = sr.content.get_image_measurement_groups()

    assert [s.referenced_sop_instance_uid for s in image_group.source_images] == [
        study[1].SOPInstanceUID
    ]
    assert [s.referenced_sop_instance_uid for s in series_group.source_images] == [
        s.SOPInstanceUID for s in study
    ]


def test_findings_citing_the_same_slices_each_list_all_of_them_in_their_own_order(study):
    """Both classes of a series model cite the same slices (and a CNN one of them): the items
    they share are built once, yet each group reads back whole, in its own order."""
    other_class = dataclasses.replace(series_finding(study), finding=NODULE)
    backwards = dataclasses.replace(
        series_finding(study[::-1]), model_name="tail-lstm", probability=0.5
    )
    findings = [image_finding(study[1]), series_finding(study), other_class, backwards]
    sr = Comprehensive3DSR.from_dataset(_build(study, findings))
    groups = sr.content.get_image_measurement_groups()

    assert [[s.referenced_sop_instance_uid for s in g.source_images] for g in groups] == [
        [study[1].SOPInstanceUID],
        [s.SOPInstanceUID for s in study],
        [s.SOPInstanceUID for s in study],
        [s.SOPInstanceUID for s in study[::-1]],
    ]


def test_algorithm_identification_names_the_model_and_its_weights(study):
    ds = _build(study, [image_finding(study[0])])

    def values(code_value: str) -> list[str]:
        items = find_content_items(ds, value_type="TEXT", recursive=True)
        return [
            str(i.TextValue) for i in items if i.ConceptNameCodeSequence[0].CodeValue == code_value
        ]

    assert values("111001") == ["chest-cnn"]  # Algorithm Name
    assert values("111003") == ["1.2.0"]  # Algorithm Version
    assert f"weights_sha256={WEIGHTS}" in values("111002")  # Algorithm Parameters
    assert "threshold=0.5" in values("111002")


def test_the_format_and_runtime_that_ran_a_model_are_named_with_it(study):
    runtime = "onnxruntime 1.32.0 (CPU, opset 17)"
    finding = dataclasses.replace(series_finding(study), model_format="onnx", runtime=runtime)
    ds = _build(study, [finding])

    parameters = [
        str(i.TextValue) for i in find_content_items(ds, value_type="TEXT", recursive=True)
        if i.ConceptNameCodeSequence[0].CodeValue == "111002"
    ]
    assert {"format=onnx", f"runtime={runtime}"} <= set(parameters)
    (equipment,) = [i for i in ds.ContributingEquipmentSequence
                    if i.ManufacturerModelName == "head-lstm"]
    assert list(equipment.SoftwareVersions) == ["0.9.1", runtime]
    assert f"(format=onnx, runtime={runtime})" in equipment.ContributionDescription


def test_image_library_lists_the_sources_and_the_daemon_is_the_device_observer(study):
    ds = _build(study, [image_finding(study[0])])
    library = find_content_items(ds, name=codes.DCM.ImageLibrary, recursive=True)
    images = find_content_items(library[0], value_type="IMAGE", recursive=True)
    observers = Comprehensive3DSR.from_dataset(ds).content.get_observer_contexts()

    assert {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images} == {
        s.SOPInstanceUID for s in study
    }
    (observer,) = observers
    assert observer.observer_type == codes.DCM.Device
    assert observer.observer_identifying_attributes.uid == DEVICE.device_uid
    assert observer.observer_identifying_attributes.name == DEVICE.ae_title


def test_image_library_states_what_a_series_shares_once_and_lists_each_slice_bare(study):
    other_series = ct_series(2, study_uid=str(study[0].StudyInstanceUID))
    ds = _build([*study, *other_series], [image_finding(study[0])])
    (library,) = find_content_items(ds, name=codes.DCM.ImageLibrary, recursive=True)
    groups = find_content_items(library, name=codes.DCM.ImageLibraryGroup)

    def named(item: Dataset, code: object) -> list[Dataset]:
        return find_content_items(item, name=code)

    assert [len(find_content_items(g, value_type="IMAGE")) for g in groups] == [len(study), 2]
    for group, series in zip(groups, (study, other_series), strict=True):
        (frame,) = named(group, codes.DCM.FrameOfReferenceUID)
        assert frame.UID == series[0].FrameOfReferenceUID
        assert named(group, codes.DCM.Modality)[0].ConceptCodeSequence[0].CodeValue == "CT"
        (thickness,) = named(group, codes.DCM.SliceThickness)
        assert float(thickness.MeasuredValueSequence[0].NumericValue) == float(
            series[0].SliceThickness
        )
        assert named(group, codes.DCM.ImagePositionPatientZ) == []  # differs per slice
        for image in find_content_items(group, value_type="IMAGE"):
            assert "ContentSequence" not in image  # entry descriptors: in the group


def test_procedure_reported_comes_from_the_modality(study):
    ds = _build(study, [image_finding(study[0])])
    (procedure,) = find_content_items(ds, name=codes.DCM.ProcedureReported)

    assert procedure.ConceptCodeSequence[0].CodeValue == "25045-6"  # CT unspecified body region


def test_previous_versions_fill_predecessor_documents(study):
    findings = [image_finding(study[0])]
    first = _build(study, findings)
    study_v2 = f"{first.SOPInstanceUID}"
    second = _build(
        study,
        findings,
        sop_instance_uid=sr_uid(study[0].StudyInstanceUID, 2, [f.model_key for f in findings]),
        instance_number=2,
        previous=[first],
    )

    (study_item,) = second.PredecessorDocumentsSequence
    assert study_item.StudyInstanceUID == study[0].StudyInstanceUID
    (series_item,) = study_item.ReferencedSeriesSequence
    assert series_item.SeriesInstanceUID == first.SeriesInstanceUID
    refs = [r.ReferencedSOPInstanceUID for r in series_item.ReferencedSOPSequence]
    assert refs == [study_v2]


def test_previous_version_with_the_new_uid_is_refused(study):
    findings = [image_finding(study[0])]
    first = _build(study, findings)
    with pytest.raises(ValueError, match="previous version"):
        _build(study, findings, previous=[first])


def test_research_model_is_marked_not_for_clinical_use(study):
    ds = _build(study, [image_finding(study[0], clinical_use=False), series_finding(study)])

    assert NOT_FOR_CLINICAL_USE in ds.SeriesDescription
    (text,) = _texts(ds)
    assert text.startswith(NOT_FOR_CLINICAL_USE)
    assert "chest-cnn 1.2.0" in text and "head-lstm" not in text


def test_clinical_models_make_no_warning(study):
    ds = _build(study, [image_finding(study[0]), series_finding(study)])

    assert ds.SeriesDescription == "AI results"
    assert _texts(ds) == []


def test_contributing_equipment_names_each_model_once(study):
    findings = [
        image_finding(study[0]),
        image_finding(study[1]),
        series_finding(study),
    ]
    ds = _build(study, findings)
    processing = [
        item
        for item in ds.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        and item.Manufacturer == DEVICE.manufacturer
    ]

    assert [(i.ManufacturerModelName, i.SoftwareVersions) for i in processing] == [
        ("chest-cnn", "1.2.0"),
        ("head-lstm", "0.9.1"),
    ]
    assert [i.DeviceUID for i in processing] == [
        model_device_uid(findings[0].model_key),
        model_device_uid(findings[2].model_key),
    ]
    assert all(
        i.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "DCM" for i in processing
    )


def test_private_coding_scheme_is_declared(study):
    ds = _build(study, [image_finding(study[0]), series_finding(study)])

    declared = {item.CodingSchemeDesignator for item in ds.CodingSchemeIdentificationSequence}
    assert declared == {SITE_SCHEME}


def test_standard_codes_need_no_declaration(study):
    ds = _build(study, [series_finding(study)])

    assert "CodingSchemeIdentificationSequence" not in ds


def test_failed_series_is_reported_as_text_and_the_rest_still_reported(study):
    failure = SeriesFailure("1.2.3.4", "head-lstm", "CUDA error:\nout of memory")
    ds = _build(study, [image_finding(study[0])], failures=[failure])

    assert _texts(ds) == [
        "Analysis of series 1.2.3.4 by model head-lstm failed: CUDA error: out of memory"
    ]
    assert len(Comprehensive3DSR.from_dataset(ds).content.get_image_measurement_groups()) == 1
    assert ds.CompletionFlag == "PARTIAL"


def test_report_of_only_failures_has_no_measurement_group(study):
    ds = _build(study, [], failures=[SeriesFailure("1.2.3.4", "head-lstm", "timeout")])

    assert Comprehensive3DSR.from_dataset(ds).content.get_image_measurement_groups() == []
    assert len(_texts(ds)) == 1


def test_nothing_to_report_is_refused(study):
    with pytest.raises(ValueError, match="nothing to report"):
        _build(study, [])


def test_complete_when_nothing_failed(study):
    assert _build(study, [image_finding(study[0])]).CompletionFlag == "COMPLETE"


def test_no_applicable_model_report_says_so(study):
    uid = study[0].StudyInstanceUID
    ds = build_no_applicable_model_sr(
        study,
        sop_instance_uid=sr_uid(uid, 1, [], "no_applicable_model"),
        series_instance_uid=series_uid(uid),
        series_number=9001,
        instance_number=1,
        device=DEVICE,
    )

    assert ds.SOPClassUID == COMPREHENSIVE_3D_SR
    assert ds.StudyInstanceUID == uid
    assert "no applicable model" in ds.SeriesDescription
    assert _texts(ds) == [NO_APPLICABLE_MODEL_TEXT]
    sr = Comprehensive3DSR.from_dataset(ds)
    assert sr.content.get_image_measurement_groups() == []
    assert len(sr.content.get_observer_contexts()) == 1


def test_zero_patient_weight_is_dropped_and_the_source_is_untouched():
    study = ct_series(2, patient_weight="0")
    ds = _build(study, [image_finding(study[0])])

    assert "PatientWeight" not in ds
    assert study[0].PatientWeight == 0


def test_real_patient_weight_is_kept():
    study = ct_series(2, patient_weight="72.5")
    assert _build(study, [image_finding(study[0])]).PatientWeight == 72.5


def test_missing_patient_attributes_become_empty():
    study = ct_series(1)
    del study[0].PatientBirthDate, study[0].AccessionNumber
    study[0].PatientSex = "X"
    ds = _build(study, [image_finding(study[0])])

    assert ds.PatientBirthDate in ("", None)
    assert ds.AccessionNumber in ("", None)
    assert ds.PatientSex in ("", None)


def test_pydicom_ct_small_header_is_a_valid_source():
    source = ct_small()
    ds = _build([source], [image_finding(source)])

    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.PatientID == source.PatientID
    assert len(Comprehensive3DSR.from_dataset(ds).content.get_image_measurement_groups()) == 1


def test_multiframe_source_without_plain_geometry_is_referenced_by_frame_not_in_library(study):
    enhanced = Dataset()
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyTime"):
        setattr(enhanced, keyword, getattr(study[0], keyword))
    enhanced.SOPClassUID = EnhancedCTImageStorage
    enhanced.SOPInstanceUID = generate_uid()
    enhanced.SeriesInstanceUID = generate_uid()
    enhanced.Modality = "CT"
    enhanced.Rows = enhanced.Columns = 512
    enhanced.NumberOfFrames = 40
    finding = Finding(
        model_name="chest-cnn",
        model_version="1.2.0",
        weights_sha256=WEIGHTS,
        level="image",
        finding=NODULE,
        probability=0.6,
        threshold=0.5,
        evidence=(Evidence(EnhancedCTImageStorage, enhanced.SOPInstanceUID, frame_number=17),),
        clinical_use=True,
    )
    ds = _build([*study, enhanced], [finding])

    (group,) = Comprehensive3DSR.from_dataset(ds).content.get_image_measurement_groups()
    (source,) = group.source_images
    assert source.referenced_sop_instance_uid == enhanced.SOPInstanceUID
    assert source.referenced_frame_numbers == [17]
    library = find_content_items(ds, name=codes.DCM.ImageLibrary, recursive=True)
    in_library = {
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for i in find_content_items(library[0], value_type="IMAGE", recursive=True)
    }
    assert enhanced.SOPInstanceUID not in in_library
    assert {s.SOPInstanceUID for s in study} <= in_library


def test_evidence_outside_the_sources_is_refused(study):
    stranger = ct_series(1, study_uid=study[0].StudyInstanceUID)[0]
    with pytest.raises(ValueError, match="not in sources"):
        _build(study, [image_finding(stranger)])


def test_sources_from_two_studies_are_refused(study):
    other = ct_series(1)
    with pytest.raises(ValueError, match="several studies"):
        _build([*study, *other], [image_finding(study[0])])


def test_no_sources_are_refused():
    with pytest.raises(ValueError, match="at least one source"):
        build_no_applicable_model_sr(
            [],
            sop_instance_uid=sr_uid("1.2.3", 1, []),
            series_instance_uid=series_uid("1.2.3"),
            series_number=1,
            instance_number=1,
            device=DEVICE,
        )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"level": "study"}, "level"),
        ({"probability": 1.5}, "probability"),
        ({"threshold": -0.1}, "threshold"),
        ({"weights_sha256": "not-a-hash"}, "sha256"),
        ({"evidence": ()}, "at least one evidence"),
    ],
)
def test_invalid_findings_are_refused(study, changes, message):
    base = image_finding(study[0]).__dict__ | changes
    with pytest.raises(ValueError, match=message):
        Finding(**base)


def test_image_level_finding_references_exactly_one_image(study):
    many = series_finding(study).evidence
    with pytest.raises(ValueError, match="exactly one image"):
        Finding(**(image_finding(study[0]).__dict__ | {"evidence": many}))


def test_written_report_reads_back_and_leaves_no_temporary_file(study, tmp_path: Path):
    ds = _build(study, [image_finding(study[0])])
    target = write_dataset(ds, tmp_path / "report.dcm")

    assert [p.name for p in tmp_path.iterdir()] == ["report.dcm"]
    back = dcmread(target)
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert len(srread(target).content.get_image_measurement_groups()) == 1


def test_failed_write_leaves_nothing_behind(study, tmp_path: Path):
    ds = _build(study, [image_finding(study[0])])
    del ds.file_meta.TransferSyntaxUID  # pydicom cannot choose an encoding without it
    with pytest.raises(ValueError, match="Transfer Syntax"):
        write_dataset(ds, tmp_path / "report.dcm")

    assert list(tmp_path.iterdir()) == []


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """One item of a code sequence."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def test_study_procedure_code_is_reported_when_it_is_standard():
    study = ct_series(1)
    study[0].ProcedureCodeSequence = [_code_item("24627-2", "LN", "CT Chest")]
    ds = _build(study, [image_finding(study[0])])
    (procedure,) = find_content_items(ds, name=codes.DCM.ProcedureReported)

    assert procedure.ConceptCodeSequence[0].CodeValue == "24627-2"


def test_local_procedure_code_of_the_study_is_declared_not_reported():
    study = ct_series(1)
    study[0].ProcedureCodeSequence = [_code_item("CTCHEST", "99RIS", "CT chest")]
    ds = _build(study, [image_finding(study[0])])
    (procedure,) = find_content_items(ds, name=codes.DCM.ProcedureReported)

    assert procedure.ConceptCodeSequence[0].CodeValue == "25045-6"
    assert ds.ProcedureCodeSequence[0].CodingSchemeDesignator == "99RIS"
    declared = {item.CodingSchemeDesignator for item in ds.CodingSchemeIdentificationSequence}
    assert declared == {SITE_SCHEME, "99RIS"}


def test_a_source_given_twice_is_listed_once_in_the_image_library(study):
    ds = _build([*study, study[0]], [image_finding(study[0])])
    library = find_content_items(ds, name=codes.DCM.ImageLibrary, recursive=True)
    images = find_content_items(library[0], value_type="IMAGE", recursive=True)

    assert len(images) == len(study)


def test_hashed_uid_is_derived_from_its_sources_not_random():
    assert hashed_uid(["pacs-ai/device/v1", "PACSAI"]) == hashed_uid(
        ["pacs-ai/device/v1", "PACSAI"]
    )
    assert hashed_uid(["a", "bc"]) != hashed_uid(["ab", "c"])
