"""Manifests of keras and onnx models: [input], [output], [explain] checked before any file
loads; a manifest without `format` is a seed model, as every existing one is."""

import json
from pathlib import Path

import pytest

from models.manifest import Manifest, ManifestError, load_manifest, parse_manifest, write_manifest
from tests.unit.models.conftest import file_manifest, manifest_fields


def _refused(tmp_path: Path, fields: dict) -> ManifestError:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(fields))
    with pytest.raises(ManifestError) as caught:
        parse_manifest(path)
    assert str(caught.value).startswith(f"{path}: ")
    return caught.value


def test_a_manifest_without_format_is_the_seed_model_it_always_was(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest_fields("cnn-a")))
    manifest = parse_manifest(path)
    assert (manifest.format, manifest.kind, manifest.level) == ("seed", "cnn", "image")
    reads = manifest.reads
    assert (reads.layout, reads.shape, reads.channels, reads.normalisation) == (
        "NHWC", [24, 24], 3, "window")


def test_a_keras_manifest_round_trips_without_seed_fields(tmp_path: Path) -> None:
    manifest = Manifest.model_validate(file_manifest("net", "keras", "net.keras"))
    text = write_manifest(manifest, tmp_path).read_text()
    assert "conv_filters" not in text and "kind" not in text and "preprocessing" not in text
    assert load_manifest(tmp_path) == manifest
    assert manifest.level == "image" and manifest.answers.activation == "none"


def test_a_keras_model_needs_input_and_output_sections(tmp_path: Path) -> None:
    fields = file_manifest("net", "keras", "net.keras")
    del fields["output"]
    error = _refused(tmp_path, fields)
    assert error.field == "output" and "needs an [input] and an [output]" in error.message


def test_seed_fields_on_a_keras_model_are_refused(tmp_path: Path) -> None:
    fields = file_manifest("net", "keras", "net.keras", input_shape=[32, 32, 3])
    error = _refused(tmp_path, fields)
    assert error.field == "input_shape" and "for the seed formats only" in error.message


def test_a_legacy_h5_whole_model_is_refused_by_name(tmp_path: Path) -> None:
    error = _refused(tmp_path, file_manifest("net", "keras", "net.h5"))
    assert error.field == "weights_file" and "legacy .h5" in error.message


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"layout": "NDHWC"}, "input.layout", "NDHWC is not for level 'image'"),
        ({"shape": [8, 32, 32]}, "input.shape", "[rows, columns]"),
        ({"spacing_mm": 2.0}, "input.spacing_mm", "is for level"),
        ({"normalisation": "range", "min": 400, "max": -1000}, "input.min", "min < max"),
        ({"normalisation": "zscore", "mean": 0.0}, "input.mean", "mean and std together"),
        ({"normalisation": "none", "window": {"center": 40, "width": 400}}, "input.window",
         "is for normalisation"),
        ({"channels": 2}, "input.channels", ""),
    ],
)
def test_an_input_section_that_contradicts_itself_is_refused(
    tmp_path: Path, changes: dict, field: str, words: str
) -> None:
    fields = file_manifest("net", "onnx", "net.onnx")
    fields["input"].update(changes)
    error = _refused(tmp_path, fields)
    assert error.field == field and words in error.message


@pytest.mark.parametrize(
    ("fmt", "input_changes", "words"),
    [
        ("onnx", {}, "no Grad-CAM for an ONNX model"),
        ("keras", {"level": "series", "layout": "NDHWC", "shape": [8, 16, 16]},
         "no Grad-CAM for a 3D"),
    ],
)
def test_heatmaps_where_no_heatmap_can_be_made_are_refused_with_the_reason(
    tmp_path: Path, fmt: str, input_changes: dict, words: str
) -> None:
    fields = file_manifest("net", fmt, f"net.{fmt}", heatmaps=True)
    fields["input"].update(input_changes)
    error = _refused(tmp_path, fields)
    assert error.field == "heatmaps" and words in error.message


def test_explain_is_for_a_keras_model_that_makes_heatmaps(tmp_path: Path) -> None:
    fields = file_manifest("net", "keras", "net.keras", explain={"layer": "Conv_1"})
    error = _refused(tmp_path, fields)
    assert error.field == "explain" and "keras model with heatmaps" in error.message
