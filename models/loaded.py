"""A model folder made ready to run: its file verified by sha256, its runtime loaded and checked
against the manifest, one synthetic batch run; then input preparation and probabilities."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from models.manifest import (
    Manifest,
    ManifestError,
    ModelInput,
    load_manifest,
    verified_weights,
)
from models.preprocess import image_batch
from models.runtimes import Runtime, load_runtime
from models.runtimes.base import item_shape

SYNTHETIC_SEQUENCE = 3  # slices in the synthetic sequence an LSTM is tried on at load
_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ModelIdentity:
    """What ran, as results and the SR name it besides name, version and sha256."""

    format: str
    runtime: str


def activate(scores: np.ndarray, activation: str) -> np.ndarray:
    """A model's class outputs as probabilities, by the manifest's `[output] activation`."""
    values = np.asarray(scores, dtype=np.float64)
    if activation == "softmax":
        values = np.exp(values - values.max(axis=-1, keepdims=True))
        values /= values.sum(axis=-1, keepdims=True)
    elif activation == "sigmoid":
        values = 1.0 / (1.0 + np.exp(-values))
    return values.astype(np.float32)


@dataclass(frozen=True)
class LoadedModel:
    """A checked model: manifest, folder, runtime and (for an image model) the traced step
    that turns decoded frames into its input batch."""

    manifest: Manifest
    folder: Path
    runtime: Runtime = field(repr=False)
    weights_path: Path
    prepare: Callable[[Any], tf.Tensor] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """The model's name from its manifest."""
        return self.manifest.name

    @property
    def model(self) -> keras.Model:
        """The Keras graph (seed and keras formats), for Grad-CAM."""
        graph = getattr(self.runtime, "keras_model", None)
        if graph is None:
            raise ValueError(f"model {self.name!r} runs on {self.runtime.version}: no Keras "
                             "graph to explain")
        return graph

    @property
    def identity(self) -> ModelIdentity:
        """Format and runtime version."""
        return ModelIdentity(self.manifest.format, self.runtime.version)

    @property
    def embedding_width(self) -> int:
        """Width of the embedding an LSTM reads (0: the model has none)."""
        embedding = self.runtime.embedding
        return int(embedding.shape[1] or 0) if embedding is not None else 0

    def predict(self, ready: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities (batch, classes) and the embedding of a ready batch; a model with a
        fixed batch of one is given one item at a time."""
        if self.runtime.input.shape[0] == 1 and len(ready) > 1:
            parts = [self.runtime.forward(ready[i:i + 1]) for i in range(len(ready))]
            scores = np.concatenate([part.scores for part in parts])
            embeddings = [part.embedding for part in parts if part.embedding is not None]
            embedding = np.concatenate(embeddings) if embeddings else None
        else:
            outputs = self.runtime.forward(ready)
            scores, embedding = outputs.scores, outputs.embedding
        probabilities = activate(scores, self.manifest.answers.activation)
        return probabilities, None if embedding is None else embedding.astype(np.float32)

    def predict_images(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and embeddings (zero wide without one) of same-sized decoded frames."""
        assert self.prepare is not None, "predict_images is for image models"
        probabilities, embedding = self.predict(self.prepare(tf.constant(frames)))
        if embedding is None:
            embedding = np.zeros((len(probabilities), 0), np.float32)
        return probabilities, embedding


@dataclass(frozen=True)
class Probe:
    """A synthetic batch run at load: its shape, the probabilities and the seconds per item."""

    shape: tuple[int, ...]
    probabilities: np.ndarray
    seconds_per_item: float


def _synthetic(loaded: LoadedModel) -> np.ndarray:
    """A reproducible batch of the model's input shape, values in 0..1 (two items where the
    batch is dynamic, so batching is tried too)."""
    manifest = loaded.manifest
    items = 1 if loaded.runtime.input.shape[0] == 1 or manifest.level == "series" else 2
    if manifest.level == "embeddings":
        shape: tuple[int, ...] = (1, SYNTHETIC_SEQUENCE, manifest.embedding_width)
    else:
        shape = (items, *item_shape(manifest.reads))
    dtype = "float32" if manifest.level == "embeddings" else manifest.reads.dtype
    return np.random.default_rng(0).random(shape).astype(dtype)


def _check_scores(loaded: LoadedModel, scores: np.ndarray, items: int) -> None:
    """What only running the model shows: output width, finite values, and whether the
    outputs are what `[output] activation` says they are."""
    path, manifest = loaded.weights_path, loaded.manifest
    classes = len(manifest.classes)
    if scores.shape != (items, classes):
        raise ManifestError(path, "classes", f"{classes} classes listed but the model answers "
                            f"{scores.shape} for a batch of {items}")
    if not np.all(np.isfinite(scores)):
        raise ManifestError(path, "output", "the model answers NaN or infinity on a "
                            "synthetic batch")
    activation = manifest.answers.activation
    low, high = float(scores.min()), float(scores.max())
    if activation == "none" and (low < -_TOLERANCE or high > 1 + _TOLERANCE):
        raise ManifestError(path, "output.activation", f"the outputs leave 0..1 (from {low:.3g}"
                            f" to {high:.3g}): logits need activation = \"softmax\" or "
                            "\"sigmoid\"")
    sums = scores.sum(axis=1)
    if activation == "softmax" and low >= 0 and np.allclose(sums, 1.0, atol=_TOLERANCE):
        raise ManifestError(path, "output.activation", "the outputs already sum to 1 (the "
                            "model ends in a softmax): declare activation = \"none\"")


def probe(loaded: LoadedModel) -> Probe:
    """Run the synthetic batch through the runtime and check what it answers."""
    batch = _synthetic(loaded)
    start = time.perf_counter()
    outputs = loaded.runtime.forward(batch)
    seconds = (time.perf_counter() - start) / len(batch)
    scores = np.asarray(outputs.scores)
    _check_scores(loaded, scores, len(batch))
    width = loaded.embedding_width
    if outputs.embedding is not None and outputs.embedding.shape != (len(batch), width):
        raise ManifestError(loaded.weights_path, "output.embedding", f"the embedding is "
                            f"{outputs.embedding.shape} for a batch of {len(batch)}, "
                            f"not (batch, {width})")
    return Probe(batch.shape, activate(scores, loaded.manifest.answers.activation), seconds)


def _explainable(loaded: LoadedModel) -> None:
    """A model that promises heatmaps has the layer Grad-CAM reads."""
    from models.gradcam import explainer

    layer = loaded.manifest.explain.layer if loaded.manifest.explain else None
    try:
        explainer(loaded.model, layer)
    except ValueError as error:
        raise ManifestError(loaded.weights_path, "explain.layer", str(error)) from error


def _preparer(spec: ModelInput) -> Callable[[Any], tf.Tensor]:
    """`image_batch` traced once for grey and once for colour frames of any size and count
    (the channel count decides the graph, so it is never left to retracing to generalise)."""
    traced = {
        channels: tf.function(lambda frames: image_batch(frames, spec), input_signature=[
            tf.TensorSpec([None, None, None, channels], tf.float32)])
        for channels in (1, 3)
    }

    def prepare(frames: Any) -> tf.Tensor:
        frames = tf.convert_to_tensor(frames, tf.float32)
        return traced[int(frames.shape[-1])](frames)

    return prepare


def load_model(folder: Path, manifest: Manifest | None = None, device: str = "cpu"
               ) -> LoadedModel:
    """Load one model folder as a worker will: manifest, sha256, runtime checked against the
    manifest, one synthetic batch; a ManifestError naming the file and field otherwise."""
    manifest = manifest or load_manifest(folder)
    weights = verified_weights(manifest, folder)
    runtime = load_runtime(manifest, weights, device)
    prepare = _preparer(manifest.reads) if manifest.level == "image" else None
    loaded = LoadedModel(manifest, folder, runtime, weights, prepare)
    if manifest.heatmaps and manifest.level == "image":
        _explainable(loaded)
    try:
        probe(loaded)
    except (ValueError, tf.errors.OpError) as error:  # ManifestError passes: not a ValueError
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ManifestError(weights, "input", "the model fails on a synthetic batch of the "
                            f"declared input: {first}") from error
    return loaded
