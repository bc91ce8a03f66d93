"""A study sent by DCMTK becomes an SR in a real Orthanc, in the same study, once; the SR and
every heatmap, fetched back from Orthanc, pass dciodvfy, PixelMed and dsrdump."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest

from tests.daemon_proc import Daemon, storescu, wait_for
from tests.interop.conftest import daemon_config
from tests.peers import Modality, Orthanc, require_dcmtk, require_orthanc
from tests.validators import (
    KNOWN_SC_WARNINGS,
    KNOWN_SR_WARNINGS,
    require,
    run_dciodvfy,
    run_dsrdump,
    run_pixelmed_sr,
)


def _series(tmp_path: Path, *, lesion: bool, seed: int, slices: int = 6) -> list[Path]:
    from models.phantom import write_series

    return write_series(
        tmp_path / f"series-{seed}", slices=slices, rows=48, cols=48, lesion=lesion, seed=seed
    )


def _sr_probabilities(sr_bytes: bytes) -> list[tuple[str, float]]:
    """(finding meaning, certainty) for each measurement group of an SR."""
    ds = pydicom.dcmread(io.BytesIO(sr_bytes))
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    out = []
    for group in sr.content.get_planar_roi_measurement_groups() + list(
        sr.content.get_image_measurement_groups()
    ):
        for measurement in group.get_measurements():
            if measurement.name.value == "111012":
                out.append(
                    (
                        group.finding_type.meaning if group.finding_type else "",
                        float(measurement.value),
                    )
                )
    return out


def _recorded(daemon: Daemon) -> list[dict[str, Any]]:
    jobs = daemon.cli_json("jobs", "list", "--kind", "analyse")
    assert jobs, "no analyse job was recorded"
    return daemon.cli_json("jobs", "show", str(jobs[0]["id"]))["results"]


def _assert_valid_dciodvfy(path: Path, iod: str, known: tuple[str, ...]) -> None:
    verdict = run_dciodvfy(path)
    assert verdict.iod == iod, verdict.output
    assert verdict.errors == (), verdict.output
    assert verdict.unexpected_warnings(known) == [], verdict.output
    declared = {
        str(item.CodingSchemeDesignator)
        for item in pydicom.dcmread(path).get("CodingSchemeIdentificationSequence", [])
    }
    assert verdict.unrecognized_coding_schemes() <= declared, verdict.output


def _assert_what_orthanc_holds_is_valid(orthanc: Orthanc, study_uid: str, folder: Path) -> None:
    """The SR and every heatmap as the PACS keeps them, fetched over its REST API."""
    (sr_id,) = orthanc.find_instances(study_uid, "SR")
    sr = folder / "sr-from-orthanc.dcm"
    sr.write_bytes(orthanc.instance_dicom(sr_id))
    _assert_valid_dciodvfy(sr, "Comprehensive3DSR", KNOWN_SR_WARNINGS)
    pixelmed = run_pixelmed_sr(sr)
    assert pixelmed.ok, pixelmed.output
    dsrdump = run_dsrdump(sr)
    assert dsrdump.document == "Comprehensive 3D SR Document", dsrdump.output
    assert dsrdump.ok, dsrdump.output
    heatmaps = orthanc.find_instances(study_uid, "OT")
    assert heatmaps, "no heatmap reached the PACS"
    for index, heatmap_id in enumerate(heatmaps):
        heatmap = folder / f"heatmap-{index}-from-orthanc.dcm"
        heatmap.write_bytes(orthanc.instance_dicom(heatmap_id))
        _assert_valid_dciodvfy(heatmap, "SCImage", KNOWN_SC_WARNINGS)


def _orthanc_for(daemon_port: int) -> Orthanc:
    return Orthanc(modalities=[Modality("PACSAI", "127.0.0.1", daemon_port)])


def _destination(orthanc: Orthanc) -> dict[str, Any]:
    return {
        "name": "orthanc",
        "ae_title": orthanc.aet,
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
    }


def test_study_from_storescu_arrives_in_orthanc_as_one_sr_with_the_recorded_findings(
    tmp_path: Path,
    demo_models: Path,
    database_url: str,
    make_daemon: Callable[..., Daemon],
) -> None:
    require_dcmtk()
    require_orthanc()
    require("dciodvfy", "pixelmed", "dsrdump")
    config = daemon_config(tmp_path, demo_models, database_url=database_url)
    with _orthanc_for(config["dicom"]["port"]) as orthanc:
        config["destinations"] = [_destination(orthanc)]
        daemon = make_daemon(config).start()
        files = _series(tmp_path, lesion=True, seed=7)
        sent = storescu(daemon.port, files)
        assert sent.returncode == 0, sent.stderr
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

        srs = wait_for(lambda: orthanc.find_sr(study_uid), 180, "the SR in Orthanc")
        assert len(srs) == 1
        sr_id = orthanc.find_instances(study_uid, "SR")[0]
        sr_bytes = orthanc.instance_dicom(sr_id)
        sr = pydicom.dcmread(io.BytesIO(sr_bytes))
        assert sr.StudyInstanceUID == study_uid
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"

        recorded = _recorded(daemon)
        reported = _sr_probabilities(sr_bytes)
        assert reported, "the SR carries no certainty values"
        recorded_values = [r["probability"] for r in recorded if r["error"] is None]
        for _meaning, value in reported:
            assert any(abs(value - p) < 1e-4 for p in recorded_values), value
        # Sending is idempotent: the one SR stays one, and the dispatch is recorded as sent.
        status = daemon.cli_json("status", "--no-echo")
        assert set(status["dispatches"]) == {"sent"}, status["dispatches"]
        assert len(orthanc.find_sr(study_uid)) == 1
        # The Grad-CAM overlays analysis left for the report are gone once their Secondary
        # Captures are written: nothing reads them again.
        assert not list(Path(config["storage"]["spool_dir"]).rglob("*.npy"))
        _assert_what_orthanc_holds_is_valid(orthanc, study_uid, tmp_path)


def test_report_waits_for_an_orthanc_that_was_down_and_is_delivered_once_it_starts(
    tmp_path: Path, demo_models: Path, make_daemon: Callable[..., Daemon]
) -> None:
    require_dcmtk()
    require_orthanc()
    config = daemon_config(tmp_path, demo_models)
    orthanc = _orthanc_for(config["dicom"]["port"])
    try:
        config["destinations"] = [_destination(orthanc)]
        daemon = make_daemon(config).start()
        files = _series(tmp_path, lesion=False, seed=3)
        assert storescu(daemon.port, files).returncode == 0
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

        def failed_once() -> bool:
            jobs = daemon.cli_json("jobs", "list", "--kind", "dispatch")
            return bool(jobs) and jobs[0]["attempts"] >= 1 and jobs[0]["state"] == "queued"

        wait_for(failed_once, 120, "a failed dispatch attempt while Orthanc is down")
        orthanc.start()
        wait_for(lambda: orthanc.find_sr(study_uid), 60, "the SR after Orthanc started")
        assert len(orthanc.find_sr(study_uid)) == 1
    finally:
        orthanc.close()


@pytest.mark.parametrize("no_model_sr", [True, False])
def test_study_no_model_accepts_gets_a_short_sr_or_none_by_switch(
    tmp_path: Path, demo_models: Path, make_daemon: Callable[..., Daemon], no_model_sr: bool
) -> None:
    require_dcmtk()
    require_orthanc()
    empty_models = tmp_path / "no-models"
    empty_models.mkdir()
    config = daemon_config(tmp_path, empty_models, report={"no_model_sr": no_model_sr})
    with _orthanc_for(config["dicom"]["port"]) as orthanc:
        config["destinations"] = [_destination(orthanc)]
        daemon = make_daemon(config).start()
        files = _series(tmp_path, lesion=False, seed=11, slices=3)
        assert storescu(daemon.port, files).returncode == 0
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

        def report_done() -> bool:
            jobs = daemon.cli_json("jobs", "list", "--kind", "report")
            return bool(jobs) and jobs[0]["state"] == "done"

        wait_for(report_done, 120, "the report job")
        if no_model_sr:
            wait_for(lambda: orthanc.find_sr(study_uid), 60, "the no-model SR")
        else:
            assert daemon.cli_json("status", "--no-echo")["reports"] == 0
        assert not [j for j in daemon.cli_json("jobs", "list") if j["state"] == "dead"]
