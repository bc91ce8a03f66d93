"""The AI results of one study as a DICOM Structured Report (TID 1500), built with highdicom."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from highdicom import ContributingEquipment
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    EnhancedSR,
    ImageContentItem,
    ImageLibraryEntryDescriptors,
    LanguageOfContentItemAndDescendants,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.tag import Tag

from daemon.report.completion import Completion
from daemon.report.inputs import CodeSpec, DeviceInfo, Evidence, Finding, SeriesFailure
from daemon.report.sources import (
    STANDARD_SCHEMES,
    check_same_study,
    clean_source,
    library_ready,
    procedure_reported,
    scheme_designators,
)
from daemon.report.uids import model_device_uid

SopClass = Literal["comprehensive3d", "enhanced"]

DEVICE_MODEL_NAME = "pacs-ai"
SERIES_DESCRIPTION = "AI results"
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"
PIXEL_DATA = Tag("PixelData")
NO_APPLICABLE_MODEL_TEXT = "No AI model applied to any series of this study."

_LANGUAGE = CodedConcept(
    value="en-US", scheme_designator="RFC5646", meaning="English (United States)"
)
_QUALITATIVE_EVALUATIONS = CodedConcept(
    value="C0034375", scheme_designator="UMLS", meaning="Qualitative Evaluations"
)
_IMAGING_MEASUREMENT_REPORT = CodedConcept.from_code(codes.cid7021.ImagingMeasurementReport)
# (130401, DCM, "Visual explanation"): DICOM's concept for a saliency map that explains an AI
# result (named in TID 1410/1411). TID 1501 as PixelMed checks it (row 10b) admits CONTAINS
# IMAGE items of any concept name, so the heatmap hangs off the finding it explains.
VISUAL_EXPLANATION = CodedConcept.from_code(codes.DCM.VisualExplanation)


def _coded(code: CodeSpec) -> CodedConcept:
    """A manifest's code as highdicom wants it."""
    return CodedConcept(
        value=code.value,
        scheme_designator=code.scheme,
        meaning=code.meaning,
        scheme_version=code.scheme_version,
    )


def _source_items(findings: Sequence[Finding]) -> dict[Evidence, SourceImageForMeasurementGroup]:
    """One source item per image the findings cite, shared by every group citing it: each
    class of a series-level model cites the same slices, and building (and then copying and
    searching) a series' references once per class was a third of a large SR's build."""
    return {
        e: SourceImageForMeasurementGroup(
            referenced_sop_class_uid=e.sop_class_uid,
            referenced_sop_instance_uid=e.sop_instance_uid,
            referenced_frame_numbers=None if e.frame_number is None else [e.frame_number],
        )
        for e in dict.fromkeys(e for finding in findings for e in finding.evidence)
    }


def _measurement_group(
    finding: Finding, sources: dict[Evidence, SourceImageForMeasurementGroup]
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for one classifier output: what, by which model, how sure, from what
    (its items taken from `sources`)."""
    finding_code = _coded(finding.finding)
    algorithm = AlgorithmIdentification(
        name=finding.model_name,
        version=finding.model_version,
        parameters=[
            f"weights_sha256={finding.weights_sha256}",
            f"threshold={finding.threshold:g}",
            f"level={finding.level}",
            *_runtime_parameters(finding),
        ],
    )
    certainty = Measurement(
        name=codes.DCM.CertaintyOfFinding,
        value=float(finding.probability),
        unit=codes.UCUM.NoUnits,
    )
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=finding.tracking_uid, identifier=finding.tracking_id
        ),
        finding_type=finding_code,
        algorithm_id=algorithm,
        measurements=[certainty],
        source_images=[sources[e] for e in finding.evidence],
    )
    group[0].ContentSequence.extend(_visual_explanation(h) for h in finding.heatmaps)
    return group


def _runtime_parameters(finding: Finding) -> list[str]:
    """The model's format and the runtime that ran it, where the results say."""
    named = (("format", finding.model_format), ("runtime", finding.runtime))
    return [f"{key}={value}" for key, value in named if value]


def _visual_explanation(heatmap: Evidence) -> ImageContentItem:
    """IMAGE item pointing at a heatmap of this finding, not a source it was computed from:
    "Source" (SCT 260753009) and "Source of Measurement" (DCM 121112) would claim the
    opposite direction of derivation."""
    return ImageContentItem(
        name=VISUAL_EXPLANATION,
        referenced_sop_class_uid=heatmap.sop_class_uid,
        referenced_sop_instance_uid=heatmap.sop_instance_uid,
        referenced_frame_numbers=None if heatmap.frame_number is None else [heatmap.frame_number],
        relationship_type=RelationshipTypeValues.CONTAINS,
    )


# Descriptors (TID 1602) that differ from slice to slice: left to the images themselves.
_PER_IMAGE_DESCRIPTORS = frozenset(
    c.value
    for c in (
        codes.DCM.ImagePositionPatientX,
        codes.DCM.ImagePositionPatientY,
        codes.DCM.ImagePositionPatientZ,
    )
)
# What images of one library group share: the values their group descriptors come from.
_GROUP_KEY = (
    "SOPClassUID",
    "Modality",
    "FrameOfReferenceUID",
    "Rows",
    "Columns",
    "PixelSpacing",
    "SliceThickness",
    "ImageOrientationPatient",
    "PatientOrientation",
    "ImagerPixelSpacing",
)
_SOURCE = CodedConcept(value="260753009", scheme_designator="SCT", meaning="Source")


def _image_library(images: Sequence[Dataset]) -> ContainerContentItem:
    """TID 1600 with its descriptors once per group of like images (row 3), entries bare.

    highdicom's ImageLibrary repeats some 16 descriptors on every entry (TID 1601 row 2, which
    is optional): for a 200-slice CT that is three quarters of a megabyte and seconds of
    building, for values every slice of a series shares. Positions stay in the images.
    """
    groups: dict[tuple[str, ...], list[Dataset]] = {}
    for ds in images:
        groups.setdefault(tuple(str(ds.get(k, "")) for k in _GROUP_KEY), []).append(ds)
    library = ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = ContentSequence()
    for members in groups.values():
        group = ContainerContentItem(
            name=codes.DCM.ImageLibraryGroup, relationship_type=RelationshipTypeValues.CONTAINS
        )
        group.ContentSequence = ContentSequence(
            item
            for item in ImageLibraryEntryDescriptors(members[0])
            if item.ConceptNameCodeSequence[0].CodeValue not in _PER_IMAGE_DESCRIPTORS
        )
        group.ContentSequence.extend(
            ImageContentItem(
                name=_SOURCE,
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
            for ds in members
        )
        library.ContentSequence.append(group)
    return library


def _observation_context(device: DeviceInfo) -> ObservationContext:
    """TID 1001 naming the daemon as the device observer."""
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=device.device_uid,
                name=device.ae_title,
                manufacturer_name=device.manufacturer,
                model_name=DEVICE_MODEL_NAME,
            ),
        )
    )


def _texts_container(texts: Sequence[str]) -> ContainerContentItem:
    """TID 1500 row "Qualitative Evaluations": free-text statements a reader must see."""
    container = ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = ContentSequence(
        [
            TextContentItem(
                name=codes.DCM.Comment,
                value=text,
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
            for text in texts
        ]
    )
    return container


def _report_content(
    sources: Sequence[Dataset],
    findings: Sequence[Finding],
    device: DeviceInfo,
    texts: Sequence[str],
) -> Dataset:
    """Root CONTAINER of TID 1500: measurement groups if any, then the texts."""
    library: dict[str, Dataset] = {}
    for ds in sources:
        if library_ready(ds):
            library.setdefault(str(ds.SOPInstanceUID), ds)
    library_images = list(library.values())
    procedure = procedure_reported(sources[0])
    if findings:
        cited = _source_items(findings)
        report = MeasurementReport(
            observation_context=_observation_context(device),
            procedure_reported=procedure,
            imaging_measurements=[_measurement_group(f, cited) for f in findings],
            title=_IMAGING_MEASUREMENT_REPORT,
            language_of_content_item_and_descendants=LanguageOfContentItemAndDescendants(_LANGUAGE),
        )
        root = report[0]
        if library_images:  # before the Imaging Measurements container, as TID 1500 orders it
            measurements_at = len(root.ContentSequence) - 1
            root.ContentSequence.insert(measurements_at, _image_library(library_images))
    else:
        # highdicom's MeasurementReport insists on a measurement group; TID 1500 does not
        # (row 10, Qualitative Evaluations, may stand alone), so build the same root here.
        root = ContainerContentItem(name=_IMAGING_MEASUREMENT_REPORT, template_id="1500")
        root.ContentSequence = ContentSequence()
        root.ContentSequence.extend(LanguageOfContentItemAndDescendants(_LANGUAGE))
        root.ContentSequence.extend(_observation_context(device))
        root.ContentSequence.append(
            CodeContentItem(
                name=codes.DCM.ProcedureReported,
                value=procedure,
                relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
            )
        )
        if library_images:
            root.ContentSequence.append(_image_library(library_images))
    if texts:
        root.ContentSequence.append(_texts_container(texts))
    return root


def _contributing_equipment(findings: Sequence[Finding], device: DeviceInfo) -> list[Dataset]:
    """IHE AIR: one Processing Equipment item per model, so a PACS knows who produced this."""
    items: list[Dataset] = []
    seen: set[str] = set()
    for finding in findings:
        if finding.model_key in seen:
            continue
        seen.add(finding.model_key)
        ran_on = f" ({', '.join(_runtime_parameters(finding))})" if finding.runtime else ""
        item = ContributingEquipment(
            manufacturer=device.manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=finding.model_name,
            # Software Versions (LO, up to 64 characters a value): the model's, its runtime's.
            software_versions=[finding.model_version, finding.runtime[:64]]
            if finding.runtime else finding.model_version,
            contribution_description=(
                f"AI model {finding.model_name} {finding.model_version}{ran_on}, "
                f"weights sha256 {finding.weights_sha256}"
            ),
        )
        item.DeviceUID = model_device_uid(finding.model_key)
        items.append(item)
    return items


def _coding_schemes(
    findings: Sequence[Finding], source: Dataset
) -> list[CodingSchemeIdentificationItem]:
    """Declare every non-standard coding scheme the SR will carry (dciodvfy warns otherwise)."""
    declared: dict[str, CodingSchemeIdentificationItem] = {}
    for finding in findings:
        code = finding.finding
        if code.scheme not in STANDARD_SCHEMES and code.scheme not in declared:
            declared[code.scheme] = CodingSchemeIdentificationItem(
                designator=code.scheme,
                name=code.scheme_name,
                version=code.scheme_version,
                responsible_organization="site",
            )
    for scheme in scheme_designators(source):
        if scheme not in STANDARD_SCHEMES and scheme not in declared:
            declared[scheme] = CodingSchemeIdentificationItem(designator=scheme)
    return list(declared.values())


def _series_description(findings: Sequence[Finding], *, no_model: bool) -> str:
    """What a PACS series list shows before anyone opens the report."""
    if no_model:
        return f"{SERIES_DESCRIPTION} - no applicable model"
    if any(not f.clinical_use for f in findings):
        return f"{SERIES_DESCRIPTION} - {NOT_FOR_CLINICAL_USE}"
    return SERIES_DESCRIPTION


def _not_for_clinical_use_text(findings: Sequence[Finding]) -> list[str]:
    """The warning in the content itself, naming the models it applies to."""
    names = sorted({f"{f.model_name} {f.model_version}" for f in findings if not f.clinical_use})
    if not names:
        return []
    return [
        f"{NOT_FOR_CLINICAL_USE}: results of {', '.join(names)} are not approved for clinical use."
    ]


def _check_references(
    sources: Sequence[Dataset],
    findings: Sequence[Finding],
    previous: Sequence[Dataset],
    sop_instance_uid: str,
    heatmap_images: Sequence[Dataset] = (),
) -> None:
    """Fail with the reason before highdicom fails with a less helpful one."""
    known = {str(ds.SOPInstanceUID) for ds in sources}
    heatmaps = {str(ds.SOPInstanceUID) for ds in heatmap_images}
    for finding in findings:
        missing = [e.sop_instance_uid for e in finding.evidence if e.sop_instance_uid not in known]
        if missing:
            raise ValueError(
                f"finding {finding.tracking_id!r} references instances not in sources: {missing}"
            )
        unknown = [h.sop_instance_uid for h in finding.heatmaps
                   if h.sop_instance_uid not in heatmaps]
        if unknown:
            raise ValueError(
                f"finding {finding.tracking_id!r} references heatmaps not in heatmap_images: "
                f"{unknown}"
            )
    if any(str(ds.SOPInstanceUID) == sop_instance_uid for ds in previous):
        raise ValueError("a previous version has the SOP Instance UID of the new report")


def _header(ds: Dataset) -> Dataset:
    """A built image without its pixel data: the SR reads only its attributes."""
    header = Dataset()
    header.update({element.tag: element for element in ds if element.tag != PIXEL_DATA})
    return header


def _build(
    sources: Sequence[Dataset],
    findings: Sequence[Finding],
    texts: Sequence[str],
    *,
    no_model: bool,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int,
    instance_number: int,
    device: DeviceInfo,
    previous: Sequence[Dataset],
    is_complete: bool,
    sop_class: SopClass,
    heatmap_images: Sequence[Dataset] = (),
) -> Dataset:
    """Shared path of both public builders."""
    check_same_study([*sources, *heatmap_images])
    _check_references(sources, findings, previous, sop_instance_uid, heatmap_images)
    # highdicom copies the patient and study modules from the first source only; the rest
    # are read for references and the image library, so they need no (costly) copy.
    cleaned = [clean_source(sources[0]), *sources[1:]]
    texts = [*_not_for_clinical_use_text(findings), *texts]
    # Heatmaps stay out of the Image Library: TID 1602 wants an image modality from CID 29,
    # and a Secondary Capture is "OT" (PixelMed rejects it); the evidence lists them.
    content = _report_content(cleaned, findings, device, texts)
    if sop_class == "comprehensive3d":
        document_class: type[Comprehensive3DSR] | type[EnhancedSR] = Comprehensive3DSR
    elif sop_class == "enhanced":
        document_class = EnhancedSR
    else:
        raise ValueError(f"sop_class must be 'comprehensive3d' or 'enhanced', got {sop_class!r}")
    return document_class(
        evidence=[*cleaned, *map(_header, heatmap_images)],
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=device.manufacturer,
        manufacturer_model_name=DEVICE_MODEL_NAME,
        software_versions=device.software_version,
        series_description=_series_description(findings, no_model=no_model),
        is_complete=is_complete,
        previous_versions=list(previous) or None,
        contributing_equipment=_contributing_equipment(findings, device),
        coding_schemes=_coding_schemes(findings, cleaned[0]) or None,
    )


def build_sr(
    sources: Sequence[Dataset],
    findings: Sequence[Finding],
    *,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int,
    instance_number: int,
    device: DeviceInfo,
    previous: Sequence[Dataset] = (),
    failures: Sequence[SeriesFailure] = (),
    sop_class: SopClass = "comprehensive3d",
    heatmap_images: Sequence[Dataset] = (),
    completion: Completion = Completion(),
) -> Dataset:
    """Build the study's AI results SR: one TID 1501 group per finding, failures as text.

    Parameters
    ----------
    sources
        Headers of the study's instances that the findings reference (at least one; the
        patient and study modules are copied from the first).
    findings
        Classifier outputs; may be empty only when ``failures`` explain why.
    sop_instance_uid, series_instance_uid
        Usually :func:`daemon.report.uids.sr_uid` and :func:`daemon.report.uids.series_uid`.
    previous
        Earlier versions of this report (Predecessor Documents Sequence).
    failures
        Series whose analysis failed; each is stated as text, the rest is still reported.
    sop_class
        ``"comprehensive3d"``, or ``"enhanced"`` for destinations that reject it.
    heatmap_images
        The explainability Secondary Captures that findings name in ``Finding.heatmaps``
        (built by :func:`daemon.report.heatmap.build_heatmap_sc`; pixel data is ignored).
        They join the evidence (not the image library, whose descriptors want an image
        modality), and each finding's group references its own as IMAGE (130401, DCM,
        "Visual explanation").
    completion
        How the study version ended (an incomplete or discontinued procedure): its notes
        are stated as text, and a partial one makes the Completion Flag PARTIAL.

    Returns
    -------
    pydicom.Dataset
        A complete SR instance (a highdicom ``Comprehensive3DSR`` or ``EnhancedSR``).
    """
    if not findings and not failures:
        raise ValueError("nothing to report: use build_no_applicable_model_sr")
    return _build(
        sources,
        findings,
        [*completion.notes, *(f.text for f in failures)],
        no_model=False,
        sop_instance_uid=sop_instance_uid,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        instance_number=instance_number,
        device=device,
        previous=previous,
        is_complete=not failures and not completion.partial,
        sop_class=sop_class,
        heatmap_images=heatmap_images,
    )


def build_no_applicable_model_sr(
    sources: Sequence[Dataset],
    *,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int,
    instance_number: int,
    device: DeviceInfo,
    previous: Sequence[Dataset] = (),
    sop_class: SopClass = "comprehensive3d",
    completion: Completion = Completion(),
) -> Dataset:
    """Build the short SR that says no model applied, so the study is visibly handled."""
    return _build(
        sources,
        (),
        [NO_APPLICABLE_MODEL_TEXT, *completion.notes],
        no_model=True,
        sop_instance_uid=sop_instance_uid,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        instance_number=instance_number,
        device=device,
        previous=previous,
        is_complete=not completion.partial,
        sop_class=sop_class,
    )
