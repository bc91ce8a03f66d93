"""The Overview's models: each folder's manifest as the workers will read it (format, what a
prediction reads, what runs it), or the problem that keeps it from loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.http.console.manifests import ModelShelf
from models.manifest import Manifest, write_manifest

CODE = {"scheme": "99PACSAI", "meaning": "test"}


def manifest(folder: Path, **fields: Any) -> None:
    """A valid manifest with `fields`, written into `folder`."""
    base = {
        "version": "2.1",
        "classes": [
            {"name": "normal", "code": {**CODE, "value": "N"}},
            {"name": "lesion", "code": {**CODE, "value": "L"}},
        ],
        "weights_sha256": "0" * 64,
        "intended_use": "tests only",
        "clinical_use": False,
    }
    folder.mkdir(parents=True)
    write_manifest(Manifest.model_validate({**base, **fields}), folder)


def test_each_model_shows_its_format_what_it_reads_and_what_runs_it(tmp_path: Path) -> None:
    models = tmp_path / "models"
    manifest(models / "cnn", name="chest-cnn", kind="cnn", input_shape=[32, 32, 3],
             weights_file="model.weights.h5")  # fmt: skip
    manifest(models / "lstm", name="chest-lstm", kind="lstm", embedding_model="chest-cnn",
             weights_file="model.weights.h5")  # fmt: skip
    manifest(
        models / "volume",
        name="ct-volume",
        format="onnx",
        opset=17,
        weights_file="model.onnx",
        input={"level": "series", "layout": "NCDHW", "shape": [16, 64, 64], "channels": 1},
        output={"activation": "softmax"},
    )
    (models / "broken").mkdir()
    (models / "broken" / "manifest.toml").write_text('name = "broken"\n')
    shelf = ModelShelf(models, frozenset({"chest-lstm"}), "gpu")
    seen = {e.folder.rsplit("/", 1)[-1]: e for e in shelf.entries()}
    described = {
        k: (e.format, e.level, e.runtime, e.shadow) for k, e in seen.items() if k != "broken"
    }
    assert described == {
        "cnn": ("seed", "image", "TensorFlow", False),
        "lstm": ("seed", "embeddings", "TensorFlow", True),
        "volume": ("onnx", "series", "onnxruntime on gpu, opset 17", False),
    }
    assert seen["broken"].problem and "manifest.toml" in seen["broken"].problem
