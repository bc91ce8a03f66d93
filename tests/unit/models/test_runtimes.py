"""Keras and ONNX model files load only when they are what the manifest says: every shape,
name, class count, layout and dtype checked at load, errors naming the file and field."""

import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

from models.demo import DemoResult, write_series
from models.examples import volume_onnx
from models.gradcam import source_heatmap
from models.infer import infer_series
from models.manifest import ManifestError
from models.registry import Choice, Registry, SeriesInfo, load_model
from tests.unit.models.conftest import MakeFolder

VOLUME_INPUT = {"level": "series", "layout": "NCDHW", "shape": [8, 16, 16], "channels": 1}


@keras.saving.register_keras_serializable(package="site")
class Doubling(keras.layers.Layer):
    """A site's own layer: Keras alone cannot rebuild it from a file."""

    def call(self, x):  # type: ignore[no-untyped-def]
        return x * 2.0


def _tiny_keras(path: Path, middle: keras.layers.Layer | None = None) -> Path:
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Flatten()(inputs)
    x = middle(x) if middle is not None else x
    keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x)).save(path)
    return path


def _refused(folder: Path, field: str) -> str:
    with pytest.raises(ManifestError) as caught:
        load_model(folder)
    assert caught.value.field == field, str(caught.value)
    return str(caught.value)


def test_a_keras_applications_backbone_loads_and_answers_per_image(
    file_folder: MakeFolder, backbone_file: Path
) -> None:
    loaded = load_model(file_folder("net", backbone_file))
    assert loaded.identity.format == "keras"
    assert loaded.identity.runtime.startswith(f"keras {keras.__version__}")
    probabilities, embedding = loaded.predict_images(np.random.default_rng(0).random(
        (3, 48, 48, 1), dtype=np.float32))
    assert probabilities.shape == (3, 2) and embedding.shape == (3, 0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    ("layer", "named"), [(Doubling(), "custom object 'site>Doubling'"),
                         (keras.layers.Lambda(lambda x: x * 2.0), "a Lambda layer")],
)
def test_a_keras_file_that_would_run_code_is_refused_naming_what_it_needs(
    tmp_path: Path, file_folder: MakeFolder, layer: keras.layers.Layer, named: str
) -> None:
    folder = file_folder("net", _tiny_keras(tmp_path / "net.keras", layer))
    message = _refused(folder, "weights_file")
    assert str(folder / "net.keras") in message and named in message


def test_a_legacy_hdf5_model_renamed_keras_is_refused(
    tmp_path: Path, file_folder: MakeFolder
) -> None:
    inputs = keras.Input((32, 32, 3))
    keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs))).save(
        tmp_path / "legacy.h5")
    (tmp_path / "legacy.h5").rename(tmp_path / "net.keras")
    assert "legacy HDF5" in _refused(file_folder("net", tmp_path / "net.keras"), "weights_file")


def test_a_truncated_keras_file_with_its_own_sha256_is_refused(
    tmp_path: Path, file_folder: MakeFolder, backbone_file: Path
) -> None:
    (tmp_path / "net.keras").write_bytes(backbone_file.read_bytes()[:50_000])
    assert "not a .keras model" in _refused(file_folder("net", tmp_path / "net.keras"),
                                            "weights_file")


def test_a_keras_input_with_other_channels_is_refused(
    file_folder: MakeFolder, backbone_file: Path
) -> None:
    folder = file_folder("net", backbone_file, input={
        "level": "image", "layout": "NHWC", "shape": [32, 32], "channels": 1})
    assert "has 3 channels where [input] (NHWC) says 1" in _refused(folder, "input.channels")


def test_a_softmax_applied_twice_is_refused(file_folder: MakeFolder, backbone_file: Path
                                            ) -> None:
    folder = file_folder("net", backbone_file, output={"activation": "softmax"})
    assert "already sum to 1" in _refused(folder, "output.activation")


def test_grad_cam_explains_a_keras_backbone_at_the_source_size(
    tmp_path: Path, file_folder: MakeFolder, backbone_file: Path
) -> None:
    loaded = load_model(file_folder("net", backbone_file, heatmaps=True))
    (path, *_) = write_series(tmp_path / "series", slices=1, rows=40, cols=56, seed=1)
    grey, heatmap = source_heatmap(loaded, path, class_index=1)
    assert grey.shape == heatmap.shape == (40, 56)
    assert 0.0 <= heatmap.min() and heatmap.max() <= 1.0


def test_an_explain_layer_the_model_lacks_is_refused_at_load(
    file_folder: MakeFolder, backbone_file: Path
) -> None:
    folder = file_folder("net", backbone_file, heatmaps=True, explain={"layer": "nope"})
    assert "no top-level layer 'nope'" in _refused(folder, "explain.layer")


def test_an_onnx_input_of_the_wrong_rank_for_the_layout_is_refused(
    tmp_path: Path, file_folder: MakeFolder
) -> None:
    folder = file_folder("vol", volume_onnx(tmp_path / "vol.onnx"))  # 5-D, manifest says NHWC
    assert "layout NHWC needs rank 4" in _refused(folder, "input.layout")


def test_an_onnx_output_narrower_than_the_class_list_is_refused(
    tmp_path: Path, file_folder: MakeFolder
) -> None:
    code = {"scheme": "99PACSAI", "meaning": "test"}
    classes = [{"name": n, "code": {**code, "value": n}} for n in ("a", "b", "c")]
    folder = file_folder("vol", volume_onnx(tmp_path / "vol.onnx"), input=VOLUME_INPUT,
                         classes=classes)
    assert "3 classes listed but the model's output" in _refused(folder, "classes")


def test_an_onnx_file_keeping_its_weights_beside_it_is_refused_at_load(
    file_folder: MakeFolder, split_onnx: Path
) -> None:
    folder = file_folder("vol", split_onnx, input=VOLUME_INPUT)
    shutil.copyfile(split_onnx.with_name("split.onnx.data"), folder / "split.onnx.data")
    assert "which its sha256 does not cover" in _refused(folder, "weights_file")


def test_an_onnx_input_name_the_file_lacks_is_refused(tmp_path: Path, file_folder: MakeFolder
                                                      ) -> None:
    folder = file_folder("vol", volume_onnx(tmp_path / "vol.onnx"),
                         input={**VOLUME_INPUT, "name": "image"})
    assert "no input named 'image'; the model has volume" in _refused(folder, "input.name")


def test_an_onnx_model_ending_in_logits_gets_the_declared_softmax(
    tmp_path: Path, file_folder: MakeFolder
) -> None:
    with_softmax = load_model(file_folder(
        "a", volume_onnx(tmp_path / "a.onnx"), input=VOLUME_INPUT))
    logits = load_model(file_folder(
        "b", volume_onnx(tmp_path / "b.onnx", softmax=False), input=VOLUME_INPUT,
        output={"activation": "softmax"}))
    volume = np.random.default_rng(2).random((1, 1, 8, 16, 16), dtype=np.float32)
    np.testing.assert_allclose(logits.predict(volume)[0], with_softmax.predict(volume)[0],
                               rtol=1e-5)


def test_a_fixed_batch_of_one_is_fed_one_item_at_a_time(
    tmp_path: Path, file_folder: MakeFolder
) -> None:
    loaded = load_model(file_folder("vol", volume_onnx(tmp_path / "vol.onnx", batch=1),
                                    input=VOLUME_INPUT))
    volumes = np.random.default_rng(3).random((3, 1, 8, 16, 16), dtype=np.float32)
    together, _ = loaded.predict(volumes)
    alone = np.concatenate([loaded.predict(volumes[i:i + 1])[0] for i in range(3)])
    assert together.shape == (3, 2)
    np.testing.assert_array_equal(together, alone)


def _onnx_cnn_manifest(demo: DemoResult) -> dict:
    """The demo CNN's own input and window, read from ONNX (Keras names its outputs)."""
    window = demo.cnn.preprocessing.window
    size = demo.cnn.input_shape[0]  # type: ignore[index]
    return {"input": {"level": "image", "layout": "NHWC", "shape": [size, size],
                      "channels": 3, "window": window.model_dump()},
            "output": {"activation": "none", "name": "Identity:0", "embedding": "Identity_1:0"},
            "classes": [label.model_dump() for label in demo.cnn.classes]}


def test_the_demo_cnn_through_onnxruntime_equals_tensorflow(
    tmp_path: Path, quick_demo: DemoResult, file_folder: MakeFolder, demo_cnn_onnx: Path
) -> None:
    seed = load_model(quick_demo.models_dir / "demo-cnn")
    onnx = load_model(file_folder("cnn-onnx", demo_cnn_onnx, **_onnx_cnn_manifest(quick_demo)))
    assert onnx.identity.runtime.startswith("onnxruntime ")
    series = write_series(tmp_path / "series", slices=6, rows=48, cols=48, lesion=True, seed=9)
    through_tf = infer_series(series, Choice(seed))
    through_onnx = infer_series(series, Choice(onnx))
    difference = np.abs(through_tf.image_probabilities - through_onnx.image_probabilities)
    assert difference.max() < 1e-4
    np.testing.assert_allclose(through_tf.embeddings, through_onnx.embeddings, atol=1e-4)


def test_the_seed_lstm_chains_on_an_onnx_cnn_embedding(
    tmp_path: Path, quick_demo: DemoResult, file_folder: MakeFolder, demo_cnn_onnx: Path
) -> None:
    folder = file_folder("demo-cnn", demo_cnn_onnx, **_onnx_cnn_manifest(quick_demo))
    (folder.parent / "demo-lstm").symlink_to(quick_demo.models_dir / "demo-lstm")
    series = write_series(tmp_path / "series", slices=5, rows=40, cols=40, lesion=True, seed=4)
    info = SeriesInfo.from_files(series)
    (through_onnx,) = Registry.load(folder.parent).select(info)
    (through_tf,) = Registry.load(quick_demo.models_dir).select(info)
    assert through_onnx.cnn.manifest.format == "onnx"
    assert [m.name for m in through_onnx.lstms] == ["demo-lstm"]
    np.testing.assert_allclose(infer_series(series, through_onnx).series[0].probabilities,
                               infer_series(series, through_tf).series[0].probabilities,
                               atol=1e-4)


def test_sigmoid_judges_each_class_on_its_own(tmp_path: Path, file_folder: MakeFolder) -> None:
    loaded = load_model(file_folder(
        "vol", volume_onnx(tmp_path / "vol.onnx", softmax=False, seed=5), input=VOLUME_INPUT,
        output={"activation": "sigmoid"}))
    volume = np.random.default_rng(4).random((1, 1, 8, 16, 16), dtype=np.float32)
    logits = loaded.runtime.forward(volume).scores
    probabilities, _ = loaded.predict(volume)
    np.testing.assert_allclose(probabilities, 1.0 / (1.0 + np.exp(-logits)), rtol=1e-6)
    assert probabilities.sum() != pytest.approx(1.0)


def test_heatmaps_from_a_backbone_nested_as_one_layer_are_refused_at_load(
    tmp_path: Path, file_folder: MakeFolder, backbone_file: Path
) -> None:
    base = keras.saving.load_model(backbone_file)
    inputs = keras.Input((32, 32, 3))
    keras.Model(inputs, base(inputs)).save(tmp_path / "nested.keras")
    folder = file_folder("net", tmp_path / "nested.keras", heatmaps=True,
                         explain={"layer": base.name})
    assert "is a nested model" in _refused(folder, "explain.layer")
