"""The seed article's architectures, pinned by parameter count."""

import numpy as np

from models.cnn import EMBEDDING_LAYER, build_cnn, compile_forward
from models.lstm import build_lstm


def test_seed_cnn_has_the_articles_parameter_count_for_two_classes() -> None:
    assert build_cnn(2).count_params() == 44_397_122


def test_seed_lstm_has_the_articles_parameter_count_for_two_classes() -> None:
    assert build_lstm(2).count_params() == 213_890


def test_cnn_exposes_a_512_wide_embedding_layer() -> None:
    model = build_cnn(3, input_shape=(32, 32, 3))
    assert model.get_layer(EMBEDDING_LAYER).units == 512
    assert model.output_shape == (None, 3)


def test_cnn_forward_returns_probabilities_and_embedding() -> None:
    forward = compile_forward(build_cnn(2, input_shape=(32, 32, 3), compile=False))
    probabilities, embedding = forward(np.random.default_rng(0).random((5, 32, 32, 3), "float32"))
    assert probabilities.shape == (5, 2) and embedding.shape == (5, 512)
    np.testing.assert_allclose(probabilities.numpy().sum(axis=1), 1.0, rtol=1e-5)


def test_lstm_ignores_zero_padding_after_the_last_slice() -> None:
    model = build_lstm(2, embedding_width=8, units=(4, 4, 4), compile=False)
    sequence = np.random.default_rng(1).random((1, 5, 8), "float32") + 0.1
    padded = np.concatenate([sequence, np.zeros((1, 3, 8), "float32")], axis=1)
    np.testing.assert_allclose(model(sequence).numpy(), model(padded).numpy(), rtol=1e-5)
