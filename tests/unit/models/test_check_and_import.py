"""`models import` makes a folder from a .keras or .onnx file; `models check` loads a folder as
a worker will and tries it: exit 0 ok, 1 fails on the study, 2 the folder is wrong."""

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from pydicom.data import get_testdata_file

from daemon.cli import main
from models.commands import check_command, import_command
from models.examples import volume_onnx
from models.manifest import load_manifest
from models.phantom import write_series


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """A small phantom CT series."""
    write_series(tmp_path / "study", slices=5, rows=40, cols=40, lesion=True, seed=8)
    return tmp_path / "study"


def test_an_imported_keras_file_passes_check_on_a_study(
    tmp_path: Path, backbone_file: Path, study: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "models" / "net"
    assert import_command(backbone_file, out, "net", "2.0") == 0
    manifest = load_manifest(out)
    assert (manifest.format, manifest.level, manifest.reads.shape) == ("keras", "image", [32, 32])
    assert manifest.selection.min_slices == 1
    assert manifest.answers.activation == "none"  # the file ends in a softmax
    assert "pacs-ai models check" in (out / "manifest.toml").read_text()
    capsys.readouterr()
    assert check_command(out, study) == 0
    printed = capsys.readouterr().out
    assert "format    keras, keras " in printed
    assert "input     'image' (?, 32, 32, 3) float32: image level, NHWC" in printed
    assert "(5 images), highest per class: class-0 " in printed and "ms per image" in printed


def test_an_imported_onnx_volume_model_runs_on_the_series_as_one_volume(
    tmp_path: Path, study: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "vol"
    assert import_command(volume_onnx(tmp_path / "v.onnx", "NCDHW"), out, "vol", "1") == 0
    manifest = load_manifest(out)
    assert (manifest.opset, manifest.reads.layout, manifest.reads.shape) == (
        17, "NCDHW", [8, 16, 16])
    assert manifest.selection.min_slices == 3  # a scout is no volume: not selected
    shutil.copyfile(get_testdata_file("CT_small.dcm"), study / "scout.dcm")
    assert main(["models", "check", str(out), "--study", str(study)]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime" in printed and "(5 slices as one volume)" in printed
    assert "ms per series" in printed and "FAILED" not in printed
    assert "(CT, 1 image) is not for vol: selection.min_slices = 3 (series: 1)" in printed


def test_a_model_that_fails_on_the_study_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "vol"
    import_command(volume_onnx(tmp_path / "v.onnx"), out, "vol", "1")
    manifest = out / "manifest.toml"  # a site admitting any series to its 3D model
    manifest.write_text(manifest.read_text().replace("min_slices = 3", "min_slices = 1"))
    write_series(tmp_path / "two", slices=2, rows=40, cols=40, seed=1)
    assert check_command(out, tmp_path / "two") == 1
    assert "FAILED on series" in capsys.readouterr().out


def test_a_folder_whose_file_changed_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "vol"
    import_command(volume_onnx(tmp_path / "v.onnx"), out, "vol", "1")
    with (out / "v.onnx").open("ab") as stream:
        stream.write(b"\0")
    assert check_command(out) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {out / 'v.onnx'}: weights_sha256: ")


def test_a_manifest_that_contradicts_the_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "vol"
    import_command(volume_onnx(tmp_path / "v.onnx"), out, "vol", "1")
    manifest = out / "manifest.toml"
    manifest.write_text(manifest.read_text().replace('layout = "NCDHW"', 'layout = "NDHWC"'))
    assert check_command(out) == 2
    assert "input.layout: the model's input 'volume' (?, 1, 8, 16, 16) float32 reads NCDHW, " \
           "not NDHWC" in capsys.readouterr().err


def test_import_refuses_a_legacy_h5_and_a_folder_in_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "old.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    assert import_command(tmp_path / "old.h5", tmp_path / "a", "a", "1") == 2
    assert "legacy HDF5" in capsys.readouterr().err
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("x")
    assert import_command(volume_onnx(tmp_path / "v.onnx"), used, "v", "1") == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_an_imported_keras_onnx_export_reads_its_final_softmax(
    tmp_path: Path, demo_cnn_onnx: Path
) -> None:
    out = tmp_path / "cnn"
    assert import_command(demo_cnn_onnx, out, "cnn", "1") == 0
    manifest = load_manifest(out)
    assert (manifest.answers.activation, manifest.answers.name) == ("none", "Identity:0")
    assert check_command(out) == 0


def test_an_onnx_export_with_its_weights_beside_it_becomes_one_file_that_answers_alike(
    tmp_path: Path, split_onnx: Path, study: Path
) -> None:
    out = tmp_path / "vol"
    assert import_command(split_onnx, out, "vol", "1") == 0
    assert sorted(path.name for path in out.iterdir()) == ["manifest.toml", "split.onnx"]
    assert "the weights split.onnx kept in files beside it are inside the copy here" in (
        out / "manifest.toml").read_text()
    volume = np.random.default_rng(0).random((1, 1, 8, 16, 16), np.float32)
    answers = [ort.InferenceSession(str(path)).run(None, {"volume": volume})[0]
               for path in (tmp_path / "whole.onnx", out / "split.onnx")]
    np.testing.assert_array_equal(*answers)
    assert check_command(out, study) == 0


def test_an_onnx_export_whose_weights_file_is_missing_is_refused_and_makes_no_folder(
    tmp_path: Path, split_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    split_onnx.with_name("split.onnx.data").unlink()
    out = tmp_path / "vol"
    assert import_command(split_onnx, out, "vol", "1") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {split_onnx}: weights_file: the weights it keeps beside it "
                           "cannot be read: ")
    assert not out.exists()


def test_a_file_that_is_no_image_model_is_refused_by_its_own_name_and_makes_no_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plane = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10, 10])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "flat", [plane],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [10])])
    source = tmp_path / "flat.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    out = tmp_path / "flat"
    assert import_command(source, out, "flat", "1") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {source}: input: the model's input 'x' (?, 10, 10) float32 "
                           "is neither an image batch (rank 4) nor a volume batch (rank 5)")
    assert not out.exists()
