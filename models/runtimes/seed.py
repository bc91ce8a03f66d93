"""The seed CNN and LSTM: the architecture rebuilt in code, the weights file loaded into it."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from models.cnn import build_cnn, compile_forward
from models.lstm import build_lstm, compile_sequence_forward
from models.manifest import Manifest, ManifestError
from models.runtimes.base import Outputs, Tensor


def tensorflow_version() -> str:
    """Keras and the TensorFlow under it, as the SR names the runtime."""
    return f"keras {keras.__version__} (tensorflow {tf.__version__})"


def build_model(manifest: Manifest, *, compile: bool = False) -> keras.Model:
    """An untrained Keras model with a seed manifest's architecture (compiled only for
    training)."""
    classes = len(manifest.classes)
    if manifest.kind == "cnn":
        assert manifest.input_shape is not None  # guaranteed by the manifest validator
        return build_cnn(
            classes, manifest.input_shape, manifest.conv_filters, manifest.embedding_width,
            compile=compile,
        )
    return build_lstm(classes, manifest.embedding_width, manifest.lstm_units, compile=compile)


class SeedRuntime:
    """A seed CNN (probabilities and its Dense embedding per image) or LSTM (probabilities
    per sequence of embeddings)."""

    format = "seed"

    def __init__(self, manifest: Manifest, weights: Path) -> None:
        self.keras_model = build_model(manifest)
        try:
            self.keras_model.load_weights(weights)
        except (ValueError, OSError) as error:
            raise ManifestError(
                weights, "weights_file", f"weights do not fit the model: {error}"
            ) from error
        self.version = tensorflow_version()
        classes, width = len(manifest.classes), manifest.embedding_width
        self.output = Tensor("probabilities", (None, classes), "float32")
        self._cnn = manifest.kind == "cnn"
        if self._cnn:
            rows, columns, channels = manifest.input_shape  # type: ignore[misc]
            self.input = Tensor("image", (None, rows, columns, channels), "float32")
            self.embedding: Tensor | None = Tensor("embedding", (None, width), "float32")
            self._image = compile_forward(self.keras_model)
        else:
            self.input = Tensor("embeddings", (None, None, width), "float32")
            self.embedding = None
            self._sequence = compile_sequence_forward(self.keras_model)

    def forward(self, batch: np.ndarray) -> Outputs:
        """Probabilities (and the CNN's embedding) of a ready batch."""
        if self._cnn:
            probabilities, embedding = self._image(batch)
            return Outputs(probabilities.numpy(), embedding.numpy())
        return Outputs(self._sequence(batch).numpy(), None)
