"""Manifests are validated before any weights load; the registry picks models per series."""

import json
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, MRImageStorage

from models.manifest import ManifestError, load_manifest, parse_manifest
from models.registry import Registry, SeriesInfo, load_model, refusal, scan_manifests
from tests.unit.models.conftest import MakeFolder, manifest_fields

CT = SeriesInfo(modality="CT", body_part="ABDOMEN", sop_class_uid=CTImageStorage, slices=40)


def test_manifest_round_trips_through_toml(make_folder: MakeFolder) -> None:
    folder = make_folder("cnn-a")
    manifest = load_manifest(folder)
    assert manifest.class_names == ["normal", "lesion"]
    assert manifest.classes[1].threshold == 0.7
    assert manifest.input_shape == (24, 24, 3)
    assert manifest.clinical_use is False and manifest.heatmaps is False


def test_json_manifest_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest_fields("cnn-j")))
    assert parse_manifest(path).name == "cnn-j"


def test_unknown_key_is_refused_naming_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest_fields("cnn-x", colour="blue")))
    with pytest.raises(ManifestError) as caught:
        parse_manifest(path)
    assert caught.value.field == "colour"
    assert str(caught.value).startswith(f"{path}: colour: ")


@pytest.mark.parametrize(("key", "meant"), [("shadw", "shadow"),
                                            ("input.layuot", "input.layout"),
                                            ("classes.1.treshold", "classes.1.threshold")])
def test_a_misspelt_key_is_named_before_the_one_it_leaves_missing_with_its_spelling(
    tmp_path: Path, key: str, meant: str
) -> None:
    fields = manifest_fields("net", format="onnx", weights_file="net.onnx", kind=None,
                             input_shape=None, input={"level": "image", "layout": "NHWC",
                                                      "shape": [24, 24]})
    *section, name = meant.split(".")
    table = fields
    for part in section:
        table = table[int(part)] if part.isdigit() else table[part]
    table[key.rsplit(".", 1)[-1]] = table.pop(name, False)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(fields))
    with pytest.raises(ManifestError) as caught:
        parse_manifest(path)
    assert caught.value.field == key
    assert caught.value.message.startswith(f"unknown key (did you mean {name}?)")


def test_bad_code_field_is_named_with_its_path(tmp_path: Path) -> None:
    fields = manifest_fields("cnn-x")
    del fields["classes"][0]["code"]["value"]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(fields))
    with pytest.raises(ManifestError, match=r"classes\.0\.code\.value"):
        parse_manifest(path)


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "manifest.toml"
    path.write_text("name = \n")
    with pytest.raises(ManifestError, match="manifest.toml: \\(syntax\\)"):
        parse_manifest(path)


def test_lstm_without_embedding_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest_fields("l", "lstm", embedding_model=None)))
    with pytest.raises(ManifestError, match="embedding_model"):
        parse_manifest(path)


def test_mismatched_weights_sha256_refuses_to_load(make_folder: MakeFolder) -> None:
    folder = make_folder("cnn-a")
    with (folder / "model.weights.h5").open("ab") as stream:
        stream.write(b"tampered")
    with pytest.raises(ManifestError) as caught:
        load_model(folder)
    assert caught.value.field == "weights_sha256"
    assert str(folder / "model.weights.h5") in str(caught.value)
    assert "refusing to load" in str(caught.value)


def test_missing_weights_file_refuses_to_load(make_folder: MakeFolder) -> None:
    folder = make_folder("cnn-a")
    (folder / "model.weights.h5").unlink()
    with pytest.raises(ManifestError, match="weights_file: weights file is missing"):
        load_model(folder)


def test_lstm_naming_an_absent_cnn_is_refused(make_folder: MakeFolder) -> None:
    make_folder("lstm-a", "lstm", embedding_model="nowhere")
    with pytest.raises(ManifestError, match="embedding_model: no cnn named 'nowhere'"):
        scan_manifests(make_folder("cnn-a").parent)


def test_lstm_with_another_embedding_width_is_refused(make_folder: MakeFolder) -> None:
    make_folder("cnn-a")
    make_folder("lstm-a", "lstm", embedding_width=32)
    with pytest.raises(ManifestError, match="embedding_width: 32 differs"):
        scan_manifests(make_folder("cnn-b").parent)


def test_two_models_with_one_name_are_refused(make_folder: MakeFolder) -> None:
    make_folder("cnn-a")
    make_folder("cnn-a", folder_name="other")
    with pytest.raises(ManifestError, match="name: 'cnn-a' is also used"):
        scan_manifests(make_folder("cnn-b").parent)


def test_registry_picks_cnn_with_its_stacked_lstms(make_folder: MakeFolder) -> None:
    make_folder("cnn-a", selection={"modalities": ["CT"]})
    make_folder("cnn-mr", selection={"modalities": ["MR"]})
    make_folder("lstm-a", "lstm", selection={"min_slices": 10})
    registry = Registry.load(make_folder("lstm-long", "lstm", selection={"min_slices": 100}).parent)
    choices = registry.select(CT)
    assert [choice.cnn.name for choice in choices] == ["cnn-a"]
    assert [lstm.name for lstm in choices[0].lstms] == ["lstm-a"]


def test_selection_rules_check_body_part_sop_class_and_slice_range(
    make_folder: MakeFolder,
) -> None:
    rules = {"body_parts": ["abdomen"], "sop_class_uids": [CTImageStorage], "max_slices": 50}
    registry = Registry.load(make_folder("cnn-a", selection=rules).parent)
    assert registry.select(CT)
    assert not registry.select(SeriesInfo("CT", "HEAD", CTImageStorage, 40))
    assert not registry.select(SeriesInfo("CT", "ABDOMEN", MRImageStorage, 40))
    assert not registry.select(SeriesInfo("CT", "ABDOMEN", CTImageStorage, 51))


@pytest.mark.parametrize(
    ("series", "rule"),
    [
        (SeriesInfo("MR", "ABDOMEN", CTImageStorage, 40), "selection.modalities = ['CT']"),
        (SeriesInfo("CT", "HEAD", CTImageStorage, 40), "selection.body_parts = ['abdomen']"),
        (SeriesInfo("CT", "ABDOMEN", MRImageStorage, 40), "selection.sop_class_uids"),
        (SeriesInfo("CT", "ABDOMEN", CTImageStorage, 2), "selection.min_slices = 3 (series: 2)"),
        (SeriesInfo("CT", "ABDOMEN", CTImageStorage, 51), "selection.max_slices = 50"),
    ],
)
def test_a_series_a_model_skips_is_told_which_selection_rule_keeps_it_off(
    make_folder: MakeFolder, series: SeriesInfo, rule: str
) -> None:
    rules = {"modalities": ["CT"], "body_parts": ["abdomen"], "sop_class_uids": [CTImageStorage],
             "min_slices": 3, "max_slices": 50}
    (model,) = Registry.load(make_folder("cnn-a", selection=rules).parent).models
    assert refusal(model.manifest, CT) is None
    assert (refusal(model.manifest, series) or "").startswith(rule)


def test_max_slices_below_min_slices_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    fields = manifest_fields("c", selection={"min_slices": 5, "max_slices": 2})
    path.write_text(json.dumps(fields))
    with pytest.raises(ManifestError, match="selection"):
        parse_manifest(path)
