"""One model of each kind in `[models] dir` (the seed pair, a Keras backbone, an ONNX 2D and an
ONNX 3D classifier): a study sent by DCMTK becomes one SR in Orthanc naming every model that
applies, with its format and runtime; replay and shadow mode work for the new formats."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.multival import MultiValue

from tests.daemon_proc import Daemon, storescu, wait_for
from tests.interop.conftest import daemon_config
from tests.peers import Modality, Orthanc, require_dcmtk, require_orthanc

PROCESSING_EQUIPMENT = "109102"


@pytest.fixture(scope="module")
def format_models(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo pair beside a Keras backbone (with heatmaps), the demo CNN exported to ONNX and
    a 3D ONNX classifier, each imported with `models import`, made in this run."""
    from models.examples import export_onnx, keras_backbone, volume_onnx
    from models.importer import import_model
    from models.registry import load_model

    root = tmp_path_factory.mktemp("formats")
    models = root / "models"
    models.mkdir()
    for name in ("demo-cnn", "demo-lstm"):
        (models / name).symlink_to(demo_models / name)
    keras_backbone(root / "net.keras", input_size=32)
    import_model(root / "net.keras", models / "net", "net", "1.0")
    manifest = models / "net" / "manifest.toml"
    manifest.write_text(manifest.read_text().replace("heatmaps = false", "heatmaps = true"))
    export_onnx(load_model(demo_models / "demo-cnn").model, root / "cnn.onnx")
    import_model(root / "cnn.onnx", models / "cnn-onnx", "cnn-onnx", "1.0")
    import_model(volume_onnx(root / "vol.onnx", "NCDHW"), models / "vol", "vol", "1.0")
    return models


def _models_in(sr_bytes: bytes) -> dict[str, list[str]]:
    """Software versions per model the SR names as Processing Equipment (IHE AIR)."""
    ds = pydicom.dcmread(io.BytesIO(sr_bytes))
    named = {}
    for item in ds.ContributingEquipmentSequence:
        if (item.PurposeOfReferenceCodeSequence[0].CodeValue == PROCESSING_EQUIPMENT
                and item.Manufacturer == "pacs-ai"):
            versions = item.SoftwareVersions
            named[str(item.ManufacturerModelName)] = (
                [str(v) for v in versions] if isinstance(versions, MultiValue) else [versions])
    return named


def _srs(orthanc: Orthanc, study_uid: str) -> list[dict[str, list[str]]]:
    return [_models_in(orthanc.instance_dicom(i)) for i in orthanc.find_instances(study_uid, "SR")]


def test_every_format_reports_in_one_sr_and_replays_alone(
    tmp_path: Path,
    format_models: Path,
    database_url: str,
    make_daemon: Callable[..., Daemon],
) -> None:
    require_dcmtk()
    require_orthanc()
    config = daemon_config(tmp_path, format_models, database_url=database_url,
                           models={"shadow": ["net"]})
    with Orthanc(modalities=[Modality("PACSAI", "127.0.0.1", config["dicom"]["port"])]) as orthanc:
        config["destinations"] = [{"name": "orthanc", "ae_title": orthanc.aet,
                                   "host": "127.0.0.1", "port": orthanc.dicom_port}]
        daemon = make_daemon(config).start()
        from models.phantom import write_series

        files = write_series(tmp_path / "ct", slices=6, rows=48, cols=48, lesion=True, seed=21)
        assert storescu(daemon.port, files).returncode == 0
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

        (first,) = wait_for(lambda: _srs(orthanc, study_uid), 240, "the SR in Orthanc")
        assert set(first) == {"demo-cnn", "demo-lstm", "cnn-onnx", "vol"}  # net: shadow
        assert first["vol"][0] == "1.0" and first["vol"][1].startswith("onnxruntime ")
        assert first["demo-cnn"][1].startswith("keras ")
        recorded: list[dict[str, Any]] = daemon.cli_json(
            "jobs", "show", str(daemon.cli_json("jobs", "list", "--kind", "analyse")[0]["id"])
        )["results"]
        by_model = {r["model"] for r in recorded if r["error"] is None}
        assert by_model == {"demo-cnn", "demo-lstm", "net", "cnn-onnx", "vol"}
        assert orthanc.find_instances(study_uid, "OT"), "no heatmap reached the PACS"

        replayed = daemon.cli("replay", study_uid, "--model", "vol")
        assert replayed.returncode == 0, replayed.stderr
        wait_for(lambda: len(orthanc.find_instances(study_uid, "SR")) == 2, 180,
                 "the replayed SR in Orthanc")
        assert {"vol"} in [set(models) for models in _srs(orthanc, study_uid)]
        assert not [j for j in daemon.cli_json("jobs", "list") if j["state"] == "dead"]
