"""Every kind of SR the daemon sends passes dciodvfy, PixelMed's SR validator and dsrdump."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread

from daemon.dispatch.scu import enhanced_twin_dataset
from daemon.report import (
    SeriesFailure,
    build_no_applicable_model_sr,
    build_sr,
    series_uid,
    sr_uid,
    write_dataset,
)
from tests.unit.report.studies import DEVICE, ct_series, ct_small, image_finding, series_finding
from tests.validators import (
    KNOWN_SR_WARNINGS,
    DciodvfyVerdict,
    DsrdumpVerdict,
    PixelMedVerdict,
    missing_tools,
    require,
    run_dciodvfy,
    run_dsrdump,
    run_pixelmed_sr,
)


def _uids(study: str, keys: list[str], version: int = 1, variant: str = "") -> dict[str, str]:
    """The UIDs the daemon derives for one report."""
    return {
        "sop_instance_uid": sr_uid(study, version, keys, variant),
        "series_instance_uid": series_uid(study),
    }


def _common(study: str, keys: list[str], **kwargs: object) -> dict[str, object]:
    """Arguments every build shares."""
    variant = "enhanced" if kwargs.get("sop_class") == "enhanced" else ""
    version = int(kwargs.pop("version", 1))  # type: ignore[call-overload]
    return {
        **_uids(study, keys, version, variant),
        "series_number": 9001,
        "instance_number": version,
        "device": DEVICE,
        **kwargs,
    }


def _with_findings(**kwargs: object) -> Dataset:
    """A CNN image result (research model), a series result of an ONNX model (format and
    runtime named), a local RIS code."""
    study = ct_series(4)
    ris_code = Dataset()
    ris_code.CodeValue, ris_code.CodingSchemeDesignator = "CTCHEST", "99RIS"
    ris_code.CodeMeaning = "CT chest"
    study[0].ProcedureCodeSequence = [ris_code]
    onnx_series = dataclasses.replace(series_finding(study), model_format="onnx",
                                      runtime="onnxruntime 1.32.0 (CPU, opset 17)")
    findings = [image_finding(study[2], clinical_use=False), onnx_series]
    uid = str(study[0].StudyInstanceUID)
    return build_sr(study, findings, **_common(uid, [f.model_key for f in findings], **kwargs))


def _findings_and_failure() -> Dataset:
    return _with_findings(failures=[SeriesFailure("1.2.3.4", "head-lstm", "out of memory")])


def _enhanced() -> Dataset:
    return _with_findings(
        sop_class="enhanced", failures=[SeriesFailure("1.2.3.4", "head-lstm", "timeout")]
    )


def _enhanced_twin() -> Dataset:
    """The Comprehensive 3D SR relabelled by dispatch for a PACS that takes only Enhanced SR."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sr.dcm"
        write_dataset(_findings_and_failure(), path)
        return enhanced_twin_dataset(path)


def _only_failures() -> Dataset:
    study = ct_series(2)
    uid = str(study[0].StudyInstanceUID)
    failures = [SeriesFailure(str(study[0].SeriesInstanceUID), "head-lstm", "timeout")]
    return build_sr(study, [], failures=failures, **_common(uid, ["head-lstm"]))


def _no_applicable_model() -> Dataset:
    study = ct_series(1)
    uid = str(study[0].StudyInstanceUID)
    return build_no_applicable_model_sr(study, **_common(uid, [], sop_class="comprehensive3d"))


def _previous_versions() -> Dataset:
    """Third version of a report; its only finding uses a standard (SCT) code."""
    study = ct_series(3)
    uid = str(study[0].StudyInstanceUID)
    findings = [series_finding(study)]
    keys = [f.model_key for f in findings]
    first = build_sr(study, findings, **_common(uid, keys, version=1))
    second = build_sr(study, findings, **_common(uid, keys, version=2, previous=[first]))
    return build_sr(study, findings, **_common(uid, keys, version=3, previous=[first, second]))


def _ct_small() -> Dataset:
    source = ct_small()
    findings = [image_finding(source)]
    uid = str(source.StudyInstanceUID)
    return build_sr([source], findings, **_common(uid, [f.model_key for f in findings]))


VARIANTS: dict[str, tuple[Callable[[], Dataset], str]] = {
    "findings_and_failure": (_findings_and_failure, "Comprehensive3DSR"),
    "only_failures": (_only_failures, "Comprehensive3DSR"),
    "no_applicable_model": (_no_applicable_model, "Comprehensive3DSR"),
    "enhanced": (_enhanced, "EnhancedSR"),
    "enhanced_twin": (_enhanced_twin, "EnhancedSR"),
    "previous_versions": (_previous_versions, "Comprehensive3DSR"),
    "ct_small_source": (_ct_small, "Comprehensive3DSR"),
}


@dataclass(frozen=True)
class Verdicts:
    """Each validator's verdict on one variant; None where the validator is not installed."""

    path: Path
    dciodvfy: DciodvfyVerdict | None
    pixelmed: PixelMedVerdict | None
    dsrdump: DsrdumpVerdict | None


def _validate(path: Path) -> Verdicts:
    """Run every installed validator once on one file."""
    return Verdicts(
        path=path,
        dciodvfy=None if missing_tools("dciodvfy") else run_dciodvfy(path),
        pixelmed=None if missing_tools("pixelmed") else run_pixelmed_sr(path),
        dsrdump=None if missing_tools("dsrdump") else run_dsrdump(path),
    )


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Verdicts]:
    """Each variant written once as the daemon writes it, then validated once (JVM is slow)."""
    folder = tmp_path_factory.mktemp("sr")
    paths = [
        write_dataset(build(), folder / f"{name}.dcm") for name, (build, _) in VARIANTS.items()
    ]
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        results = list(pool.map(_validate, paths))
    return dict(zip(VARIANTS, results, strict=True))


@pytest.mark.parametrize("variant", VARIANTS)
def test_dciodvfy_finds_the_iod_and_no_error(verdicts, variant):
    require("dciodvfy")
    verdict = verdicts[variant].dciodvfy
    assert verdict is not None

    assert verdict.iod == VARIANTS[variant][1], verdict.output
    assert verdict.errors == (), verdict.output
    assert verdict.unexpected_warnings(KNOWN_SR_WARNINGS) == [], verdict.output


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_coding_scheme_dciodvfy_does_not_know_is_declared(verdicts, variant):
    require("dciodvfy")
    verdict = verdicts[variant].dciodvfy
    assert verdict is not None
    ds = dcmread(verdicts[variant].path, stop_before_pixels=True)
    declared = {
        str(item.CodingSchemeDesignator)
        for item in ds.get("CodingSchemeIdentificationSequence", [])
    }

    assert verdict.unrecognized_coding_schemes() <= declared, verdict.output


def test_standard_codes_make_no_coding_scheme_warning(verdicts):
    require("dciodvfy")
    verdict = verdicts["previous_versions"].dciodvfy
    assert verdict is not None

    assert verdict.unrecognized_coding_schemes() == set(), verdict.output


@pytest.mark.parametrize("variant", VARIANTS)
def test_pixelmed_validates_the_root_template_without_error(verdicts, variant):
    require("pixelmed")
    verdict = verdicts[variant].pixelmed
    assert verdict is not None

    assert verdict.root_template_validated, verdict.output
    assert verdict.error_lines == (), verdict.output


@pytest.mark.parametrize("variant", VARIANTS)
def test_dsrdump_reads_the_document(verdicts, variant):
    require("dsrdump")
    verdict = verdicts[variant].dsrdump
    assert verdict is not None

    assert verdict.ok, verdict.output
