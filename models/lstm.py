"""The seed article's LSTM: stacked LSTMs over a series' ordered slice embeddings."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

PADDING_VALUE = 0.0

SequenceForward = Callable[[tf.Tensor], tf.Tensor]


def build_lstm(
    classes: int,
    embedding_width: int = 512,
    units: Sequence[int] = (64, 64, 64),
    *,
    compile: bool = True,
) -> keras.Model:
    """Build the seed LSTM over variable-length, zero-padded embedding sequences (compiled for
    training unless `compile` is false)."""
    inputs = keras.Input(shape=(None, embedding_width), name="embeddings")
    x = keras.layers.Masking(mask_value=PADDING_VALUE, name="padding")(inputs)
    for index, width in enumerate(units, start=1):
        last = index == len(units)
        x = keras.layers.LSTM(width, return_sequences=not last, name=f"lstm{index}")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="lstm")
    if compile:
        model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def compile_sequence_forward(model: keras.Model) -> SequenceForward:
    """A traced forward pass over (batch, slices, width) that does not retrace per length."""
    width = model.input_shape[-1]

    @tf.function(input_signature=[tf.TensorSpec([None, None, width], tf.float32)])
    def forward(sequences: tf.Tensor) -> tf.Tensor:
        return model(sequences, training=False)

    return forward
