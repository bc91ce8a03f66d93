"""The seed article's CNN: three conv/pool stages, a 512-wide embedding, softmax per image."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

EMBEDDING_LAYER = "embedding"
PROBABILITIES_LAYER = "probabilities"

Forward = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


def build_cnn(
    classes: int,
    input_shape: Sequence[int] = (224, 224, 3),
    conv_filters: Sequence[int] = (32, 64, 128),
    embedding_width: int = 512,
    *,
    compile: bool = True,
) -> keras.Model:
    """Build the seed CNN (compiled for training unless `compile` is false); the manifest
    supplies sizes, the seed values are defaults."""
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    for index, filters in enumerate(conv_filters, start=1):
        x = keras.layers.Conv2D(filters, (3, 3), activation="relu", name=f"conv{index}")(x)
        x = keras.layers.MaxPooling2D((2, 2), name=f"pool{index}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(embedding_width, activation="relu", name=EMBEDDING_LAYER)(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name=PROBABILITIES_LAYER)(x)
    model = keras.Model(inputs, outputs, name="cnn")
    if compile:
        model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def with_embedding(model: keras.Model) -> keras.Model:
    """The same layers with two outputs, (probabilities, embedding), sharing the weights."""
    embedding = model.get_layer(EMBEDDING_LAYER).output
    return keras.Model(model.inputs, [model.output, embedding], name="cnn_with_embedding")


def compile_forward(
    model: keras.Model, prepare: Callable[[tf.Tensor], tf.Tensor] | None = None
) -> Forward:
    """A traced forward pass returning (probabilities, embedding) for a batch of images.

    `prepare` (e.g. resize to the input size) runs inside the same graph, batched.
    """
    both = with_embedding(model)

    @tf.function(reduce_retracing=True)
    def forward(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        inputs = prepare(images) if prepare is not None else images
        probabilities, embedding = both(inputs, training=False)
        return probabilities, embedding

    return forward
