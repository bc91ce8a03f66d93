"""The analysis runs every format: a Keras image model per image, an ONNX volume model per
series; a series a model cannot read gets an error row and the rest is still recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.analyse import SeriesFiles, analyse_one_series, restrict
from models.examples import keras_backbone, volume_onnx
from models.importer import import_model
from models.phantom import write_series
from models.registry import Registry


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """A keras.applications backbone and a 3D ONNX classifier, imported as a site would."""
    root = tmp_path_factory.mktemp("formats")
    keras_backbone(root / "net.keras", input_size=32)
    import_model(root / "net.keras", root / "models" / "net", "net", "1")
    import_model(volume_onnx(root / "vol.onnx", "NDHWC"), root / "models" / "vol", "vol", "1")
    # Admitting series of any length (import writes at least 3), as a site may: a series too
    # short for a volume then reaches the model.
    manifest = root / "models" / "vol" / "manifest.toml"
    manifest.write_text(manifest.read_text().replace("min_slices = 3", "min_slices = 1"))
    return Registry.load(root / "models")


def _series(tmp_path: Path, slices: int) -> SeriesFiles:
    paths = write_series(tmp_path / f"s{slices}", slices=slices, rows=40, cols=40, seed=slices)
    return SeriesFiles("1.2.826.0.1.3680043.8.498.1", tuple(paths))


def test_each_format_gives_its_rows_with_format_and_runtime(
    registry: Registry, tmp_path: Path
) -> None:
    rows = analyse_one_series(_series(tmp_path, 5), registry)
    net = [r for r in rows if r["model_name"] == "net"]
    vol = [r for r in rows if r["model_name"] == "vol"]
    assert {(r["level"], r["label"]) for r in net} == {("image", "class-0"), ("image", "class-1")}
    assert len(net) == 5 * 2 and len(vol) == 2
    assert all(r["level"] == "series" and len(r["detail"]["ordering"]["slices"]) == 5
               for r in vol)
    assert net[0]["detail"]["format"] == "keras"
    assert vol[0]["detail"]["runtime"].startswith("onnxruntime ")
    assert sum(r["probability"] for r in vol) == pytest.approx(1.0, rel=1e-5)


def test_a_series_too_short_for_a_volume_is_an_error_row_and_the_rest_is_kept(
    registry: Registry, tmp_path: Path
) -> None:
    rows = analyse_one_series(_series(tmp_path, 2), registry)
    (error,) = [r for r in rows if r.get("error")]
    assert error["model_name"] == "vol" and "at least 3 slices" in error["error"]
    assert len([r for r in rows if r["model_name"] == "net"]) == 2 * 2


def test_a_replay_of_the_volume_model_runs_only_it(registry: Registry) -> None:
    only = restrict(registry, ["vol"])
    assert (only.cnns, [m.name for m in only.volumes]) == ((), ["vol"])


def test_a_series_with_a_file_that_is_not_dicom_is_one_error_row_naming_it(
    registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    series = _series(tmp_path, 3)
    series.paths[1].write_bytes(b"not a DICOM file " * 64)
    (row,) = analyse_one_series(series, registry)
    assert row["model_name"] == "(selection)" and row["level"] == "series"
    assert str(series.paths[1]) in row["error"] and "not a readable DICOM file" in row["error"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "series analysis failed"
    ]


def test_the_volume_model_orders_the_headers_the_selection_read(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each header is parsed once per analysis: the volume's own reader is never called."""
    import models.volume

    def read_again(path: Path) -> None:
        raise AssertionError(f"{path} read a second time")

    monkeypatch.setattr(models.volume, "read_deferred", read_again)
    rows = analyse_one_series(_series(tmp_path, 4), registry)
    vol = [r for r in rows if r["model_name"] == "vol"]
    assert len(vol) == 2 and not any(r.get("error") for r in vol)
