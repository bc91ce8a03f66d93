"""Heatmap Secondary Captures pass dciodvfy; an SR that references them passes all three
validators (dciodvfy, PixelMed's DicomSRValidator, dsrdump)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import EnhancedCTImageStorage

from daemon.report import (
    Finding,
    build_heatmap_sc,
    build_sr,
    heatmap_evidence,
    series_uid,
    sr_uid,
    write_dataset,
)
from models.phantom import write_series
from tests.unit.report.studies import DEVICE, ct_series, ct_small, image_finding, series_finding
from tests.validators import (
    KNOWN_SC_WARNINGS,
    KNOWN_SR_WARNINGS,
    DciodvfyVerdict,
    missing_tools,
    require,
    run_dciodvfy,
    run_dsrdump,
    run_pixelmed_sr,
)


def _capture(source: Dataset, finding: Finding, *, frame: int | None = None) -> Dataset:
    """A heatmap of one finding on one source, with a gradient overlay of its size."""
    rows, columns = int(source.Rows), int(source.Columns)
    ramp = np.linspace(0, 255, rows * columns).reshape(rows, columns).astype(np.uint8)
    return build_heatmap_sc(
        source,
        np.stack([ramp, ramp[::-1], np.full_like(ramp, 40)], axis=-1),
        model_name=finding.model_name,
        model_version=finding.model_version,
        weights_sha256=finding.weights_sha256,
        finding=finding.finding,
        study_version=1,
        clinical_use=finding.clinical_use,
        device=DEVICE,
        series_number=7702,
        instance_number=1,
        frame_number=frame,
    )


def _research_ct() -> Dataset:
    source = ct_series(1)[0]
    return _capture(source, image_finding(source, clinical_use=False))


def _clinical_ct() -> Dataset:
    source = ct_series(1)[0]
    return _capture(source, image_finding(source, clinical_use=True))


def _scanner_header() -> Dataset:
    source = ct_small()
    return _capture(source, image_finding(source))


def _phantom_file(folder: Path) -> Dataset:
    (path,) = write_series(folder, slices=1, rows=48, cols=64, lesion=True, seed=2)
    source = dcmread(path, stop_before_pixels=True)
    return _capture(source, image_finding(source, clinical_use=False))


def _frame_of_multiframe() -> Dataset:
    source = ct_series(1)[0]
    source.SOPClassUID = EnhancedCTImageStorage
    source.NumberOfFrames = 4
    return _capture(source, image_finding(source), frame=3)


SC_VARIANTS: dict[str, Callable[[Path], Dataset]] = {
    "research_ct": lambda _: _research_ct(),
    "clinical_ct": lambda _: _clinical_ct(),
    "scanner_header": lambda _: _scanner_header(),
    "phantom_file": _phantom_file,
    "frame_of_multiframe": lambda _: _frame_of_multiframe(),
}


def _sr_with_heatmaps(sop_class: str) -> tuple[Dataset, list[Dataset]]:
    """A CNN finding with two heatmaps and an LSTM finding without, as the daemon builds it."""
    study = ct_series(4)
    plain = image_finding(study[2], clinical_use=False)
    captures = [_capture(study[2], plain), _capture(study[1], plain)]
    findings = [
        dataclasses.replace(plain, heatmaps=tuple(map(heatmap_evidence, captures))),
        series_finding(study),
    ]
    uid = str(study[0].StudyInstanceUID)
    variant = "enhanced" if sop_class == "enhanced" else ""
    sr = build_sr(
        study,
        findings,
        sop_instance_uid=sr_uid(uid, 1, [f.model_key for f in findings], variant),
        series_instance_uid=series_uid(uid),
        series_number=9001,
        instance_number=1,
        device=DEVICE,
        heatmap_images=captures,
        sop_class=sop_class,  # type: ignore[arg-type]
    )
    return sr, captures


@pytest.fixture(scope="module")
def sc_verdicts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DciodvfyVerdict | None]:
    """Each capture written as the daemon writes it, then checked once by dciodvfy."""
    folder = tmp_path_factory.mktemp("heatmaps")
    paths = [
        write_dataset(build(folder / name), folder / f"{name}.dcm")
        for name, build in SC_VARIANTS.items()
    ]
    if missing_tools("dciodvfy"):
        return dict.fromkeys(SC_VARIANTS)
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return dict(zip(SC_VARIANTS, pool.map(run_dciodvfy, paths), strict=True))


@pytest.fixture(scope="module", params=["comprehensive3d", "enhanced"])
def sr_files(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SR referencing heatmaps, and the heatmaps, written side by side."""
    folder = tmp_path_factory.mktemp(f"sr-{request.param}")
    sr, captures = _sr_with_heatmaps(request.param)
    for capture in captures:
        write_dataset(capture, folder / f"{capture.SOPInstanceUID}.dcm")
    return write_dataset(sr, folder / "sr.dcm")


@pytest.mark.parametrize("variant", SC_VARIANTS)
def test_dciodvfy_finds_a_secondary_capture_and_no_error(sc_verdicts, variant):
    require("dciodvfy")
    verdict = sc_verdicts[variant]
    assert verdict is not None

    assert verdict.iod == "SCImage", verdict.output
    assert verdict.errors == (), verdict.output
    assert verdict.unexpected_warnings(KNOWN_SC_WARNINGS) == [], verdict.output


def test_a_source_with_known_body_part_makes_no_laterality_warning(sc_verdicts):
    require("dciodvfy")
    verdict = sc_verdicts["phantom_file"]
    assert verdict is not None

    assert verdict.unexpected_warnings(KNOWN_SR_WARNINGS) == [], verdict.output


def test_dciodvfy_accepts_the_sr_referencing_heatmaps(sr_files):
    require("dciodvfy")
    verdict = run_dciodvfy(sr_files)

    assert verdict.iod in ("Comprehensive3DSR", "EnhancedSR"), verdict.output
    assert verdict.errors == (), verdict.output
    assert verdict.unexpected_warnings(KNOWN_SR_WARNINGS) == [], verdict.output


def test_pixelmed_validates_the_sr_referencing_heatmaps(sr_files):
    require("pixelmed")
    verdict = run_pixelmed_sr(sr_files)

    assert verdict.root_template_validated, verdict.output
    assert verdict.error_lines == (), verdict.output


def test_dsrdump_reads_the_sr_referencing_heatmaps(sr_files):
    require("dsrdump")
    verdict = run_dsrdump(sr_files)

    assert verdict.ok, verdict.output
    assert "Visual explanation" in verdict.output
