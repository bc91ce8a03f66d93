"""Fixtures for the models tests: tiny model folders and one quick demo per session."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from models.demo import DemoConfig, DemoResult, make_demo
from models.manifest import Manifest, sha256_of, write_manifest
from models.registry import build_model

MakeFolder = Callable[..., Path]


def manifest_fields(name: str, kind: str = "cnn", **overrides: object) -> dict:
    """A valid manifest as a dict, small enough to build in milliseconds."""
    code = {"scheme": "99PACSAI", "meaning": "test"}
    fields: dict = {
        "name": name,
        "version": "1",
        "kind": kind,
        "classes": [
            {"name": "normal", "code": {**code, "value": "N"}},
            {"name": "lesion", "code": {**code, "value": "L"}, "threshold": 0.7},
        ],
        "weights_file": "model.weights.h5",
        "weights_sha256": "0" * 64,
        "intended_use": "tests only",
        "clinical_use": False,
        "embedding_width": 16,
        "conv_filters": [4, 4, 4],
        "lstm_units": [4, 4, 4],
    }
    if kind == "cnn":
        fields["input_shape"] = [24, 24, 3]
    else:
        fields["embedding_model"] = "cnn-a"
    fields.update(overrides)
    return fields


@pytest.fixture
def make_folder(tmp_path: Path) -> MakeFolder:
    """Write a model folder (random weights, manifest with their sha256) under tmp/models."""

    def make(
        name: str, kind: str = "cnn", folder_name: str | None = None, **overrides: object
    ) -> Path:
        folder = tmp_path / "models" / (folder_name or name)
        folder.mkdir(parents=True)
        manifest = Manifest.model_validate(manifest_fields(name, kind, **overrides))
        build_model(manifest).save_weights(folder / manifest.weights_file)
        digest = sha256_of(folder / manifest.weights_file)
        write_manifest(manifest.model_copy(update={"weights_sha256": digest}), folder)
        return folder

    return make


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    """The demo at its quick size, trained once for every test that needs real models."""
    return make_demo(tmp_path_factory.mktemp("demo"), DemoConfig.quick(), progress=False)


def file_manifest(name: str, fmt: str, weights_file: str, **overrides: object) -> dict:
    """A keras or onnx manifest as a dict (image level, 32x32 NHWC RGB unless overridden)."""
    code = {"scheme": "99PACSAI", "meaning": "test"}
    fields: dict = {
        "name": name,
        "version": "1",
        "format": fmt,
        "classes": [
            {"name": "normal", "code": {**code, "value": "N"}},
            {"name": "lesion", "code": {**code, "value": "L"}, "threshold": 0.7},
        ],
        "weights_file": weights_file,
        "weights_sha256": "0" * 64,
        "intended_use": "tests only",
        "clinical_use": False,
        "input": {"level": "image", "layout": "NHWC", "shape": [32, 32], "channels": 3},
        "output": {"activation": "none"},
    }
    fields.update(overrides)
    return fields


@pytest.fixture
def file_folder(tmp_path: Path) -> MakeFolder:
    """A model folder around a model file (copied in), its manifest carrying its sha256."""

    def make(name: str, source: Path, fmt: str | None = None, **overrides: object) -> Path:
        folder = tmp_path / "models" / name
        folder.mkdir(parents=True)
        shutil.copyfile(source, folder / source.name)
        fmt = fmt or source.suffix.lstrip(".")
        fields = file_manifest(name, fmt, source.name, **overrides)
        fields["weights_sha256"] = sha256_of(folder / source.name)
        manifest = Manifest.model_validate(fields)
        write_manifest(manifest, folder)
        return folder

    return make


@pytest.fixture(scope="session")
def backbone_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A keras.applications MobileNetV2 (random weights, 32x32) saved as a whole .keras."""
    from models.examples import keras_backbone

    path = tmp_path_factory.mktemp("keras") / "backbone.keras"
    keras_backbone(path, input_size=32, classes=2)
    return path


@pytest.fixture(scope="session")
def demo_cnn_onnx(quick_demo: DemoResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick demo CNN, with its embedding as a second output, exported by Keras to ONNX."""
    from models.cnn import with_embedding
    from models.examples import export_onnx
    from models.registry import load_model

    seed_cnn = load_model(quick_demo.models_dir / "demo-cnn").model
    return export_onnx(with_embedding(seed_cnn), tmp_path_factory.mktemp("onnx") / "cnn.onnx")


@pytest.fixture
def split_onnx(tmp_path: Path) -> Path:
    """A 3D ONNX classifier (the same weights as `whole.onnx` beside the folder) saved the way
    PyTorch's exporter saves by default: the graph in `split.onnx`, the weights beside it in
    `split.onnx.data`."""
    import onnx

    from models.examples import volume_onnx

    folder = tmp_path / "export"
    folder.mkdir()
    proto = onnx.load(str(volume_onnx(tmp_path / "whole.onnx")))
    onnx.save_model(proto, str(folder / "split.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="split.onnx.data", size_threshold=0)
    return folder / "split.onnx"
