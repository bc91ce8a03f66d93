"""A whole Keras model (`.keras`: architecture and weights), loaded in safe mode: a model file
never runs code, so Lambda layers and custom objects are refused at load, naming them."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from models.manifest import Manifest, ManifestError
from models.runtimes.base import Outputs, Tensor, check_input, check_output, pick
from models.runtimes.seed import tensorflow_version

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Errors Keras raises for a file it cannot rebuild (unknown class, bad config, bad weights).
LOAD_ERRORS = (TypeError, ValueError, KeyError, OSError, AttributeError, zipfile.BadZipFile)


def _configs(node: Any) -> Iterator[dict[str, Any]]:
    """Every serialized object (a dict with a class_name) in a Keras config, nested ones too."""
    if isinstance(node, dict):
        if "class_name" in node:
            yield node
        for value in node.values():
            yield from _configs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _configs(value)


def _foreign(item: dict[str, Any]) -> str | None:
    """Why Keras alone cannot rebuild an object (custom class, or a Lambda's Python code)."""
    if item.get("class_name") == "Lambda":
        return f"a Lambda layer {item.get('config', {}).get('name', '')!r} (Python code)"
    if item.get("class_name") == "__keras_tensor__":
        return None  # a reference between layers, not an object
    module, registered = item.get("module"), str(item.get("registered_name") or "")
    if module is not None and str(module).split(".")[0] in ("keras", "builtins") and (
            ">" not in registered):
        return None
    name = registered or item["class_name"]
    return f"custom object {name!r}" + (f" from {module}" if module else "")


def refuse_unsafe(path: Path) -> None:
    """One line naming what a `.keras` file needs beyond Keras (or that it is not one), before
    Keras tries: the site learns what to change, and no code in the file runs."""
    with path.open("rb") as stream:
        head = stream.read(len(HDF5_SIGNATURE))
    if head == HDF5_SIGNATURE:
        raise ManifestError(path, "weights_file", "a legacy HDF5 (.h5) whole model: re-save "
                            "it with model.save('model.keras') and update the manifest")
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as error:
        raise ManifestError(path, "weights_file",
                            f"not a .keras model file (a zip with config.json): {error}") from error
    needs = sorted({reason for item in _configs(config) if (reason := _foreign(item))})
    if needs:
        raise ManifestError(path, "weights_file", f"needs {', '.join(needs)}, which pacs-ai "
                            "does not load (a model file must not run code): rebuild it from "
                            "Keras layers, or export it to ONNX")


def read_model(path: Path) -> keras.Model:
    """A `.keras` file as Keras rebuilds it in safe mode, refused first for what would run
    code; ManifestError with Keras' own first line otherwise."""
    refuse_unsafe(path)
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except LOAD_ERRORS as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ManifestError(path, "weights_file", f"Keras cannot load it: {first}") from error


def input_name(model: keras.Model, index: int) -> str:
    """The name of a functional model's input layer."""
    return str(model.inputs[index]._keras_history.operation.name)


class KerasRuntime:
    """Any `.keras` model Keras rebuilds from its own layers, run by a traced forward."""

    format = "keras"

    def __init__(self, manifest: Manifest, path: Path) -> None:
        assert manifest.input is not None and manifest.output is not None  # the validator's
        model = read_model(path)
        self.keras_model = model
        self.version = tensorflow_version()
        spec, answers = manifest.input, manifest.output
        names = [input_name(model, i) for i in range(len(model.inputs))]
        if len(names) != 1:
            raise ManifestError(path, "input.name", f"the model has {len(names)} inputs "
                                f"({', '.join(names)}); pacs-ai feeds one")
        pick(path, "input.name", spec.name, names, "input")
        tensor = model.inputs[0]
        self.input = Tensor(names[0], tuple(tensor.shape), str(tensor.dtype))
        check_input(path, spec, self.input)
        out_names = list(model.output_names)
        chosen = out_names.index(pick(path, "output.name", answers.name, out_names, "output"))
        output = model.outputs[chosen]
        self.output = Tensor(out_names[chosen], tuple(output.shape), str(output.dtype))
        fetch = [output]
        self.embedding: Tensor | None = None
        if answers.embedding is not None:
            try:
                embedding = model.get_layer(answers.embedding).output
            except (ValueError, AttributeError) as error:
                raise ManifestError(path, "output.embedding", str(error)) from error
            self.embedding = Tensor(answers.embedding, tuple(embedding.shape),
                                    str(embedding.dtype))
            fetch.append(embedding)
        check_output(path, manifest, self.output, self.embedding)
        both = keras.Model(model.inputs, fetch)
        signature = tf.TensorSpec((None, *self.input.shape[1:]), self.input.dtype)

        @tf.function(input_signature=[signature])
        def forward(batch: tf.Tensor) -> list[tf.Tensor]:
            result = both(batch, training=False)
            return list(result) if isinstance(result, list | tuple) else [result]

        self._forward = forward

    def forward(self, batch: np.ndarray) -> Outputs:
        """The class output (and embedding) of a ready batch."""
        result = [tensor.numpy() for tensor in self._forward(batch)]
        return Outputs(result[0], result[1] if len(result) > 1 else None)
