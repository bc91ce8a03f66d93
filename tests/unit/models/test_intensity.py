"""Intensity scaling for keras and onnx models (window, range, zscore, none) on the Modality
LUT's values, and the batch a model reads (channels, layout, dtype)."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydantic import ValidationError

from models.manifest import Intensity, ModelInput
from models.preprocess import decode_frames, image_batch, volume_batch
from tests.unit.models.test_preprocess import resaved, shipped

CT = "CT_small.dcm"


def _hu() -> np.ndarray:
    ds = pydicom.dcmread(shipped(CT))
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _decoded(path: Path, **fields: object) -> np.ndarray:
    (frame,) = decode_frames(path, Intensity.model_validate(fields))
    return frame[..., 0]


def test_range_clips_modality_values_and_maps_them_onto_zero_one() -> None:
    expected = (np.clip(_hu(), -1000, 400) + 1000) / 1400
    np.testing.assert_allclose(_decoded(shipped(CT), normalisation="range", min=-1000, max=400),
                               expected, atol=1e-5)


def test_zscore_uses_the_given_mean_and_std() -> None:
    np.testing.assert_allclose(_decoded(shipped(CT), normalisation="zscore", mean=40, std=200),
                               (_hu() - 40) / 200, atol=1e-4)


def test_zscore_without_mean_and_std_measures_them_on_the_image() -> None:
    values = _decoded(shipped(CT), normalisation="zscore")
    assert values.mean() == pytest.approx(0.0, abs=1e-4)
    assert values.std() == pytest.approx(1.0, abs=1e-4)


def test_none_passes_the_modality_values() -> None:
    np.testing.assert_allclose(_decoded(shipped(CT), normalisation="none"), _hu(), atol=1e-3)


def test_monochrome1_is_inverted_for_a_range(tmp_path: Path) -> None:
    path = resaved(tmp_path, CT, PhotometricInterpretation="MONOCHROME1")
    normal = _decoded(shipped(CT), normalisation="range", min=-1000, max=400)
    np.testing.assert_allclose(_decoded(path, normalisation="range", min=-1000, max=400),
                               1.0 - normal, atol=1e-6)


def test_a_batch_takes_the_models_channels_layout_and_dtype() -> None:
    spec = ModelInput(level="image", layout="NCHW", shape=[8, 12], channels=1, dtype="float16")
    colour = np.random.default_rng(0).random((2, 16, 24, 3), dtype=np.float32)
    batch = np.asarray(image_batch(colour, spec))
    assert batch.shape == (2, 1, 8, 12) and batch.dtype == np.float16


def test_standardise_takes_each_channel_after_the_window_as_torchvision_normalize() -> None:
    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    spec = ModelInput(level="image", layout="NCHW", shape=[8, 8], channels=3,
                      standardise=imagenet)
    grey = np.random.default_rng(0).random((2, 8, 8, 1), dtype=np.float32)
    batch = np.asarray(image_batch(grey, spec))
    expected = (grey - np.array(imagenet["mean"])) / np.array(imagenet["std"])
    np.testing.assert_allclose(batch, expected.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-6)


def test_a_volume_is_standardised_too() -> None:
    spec = ModelInput(level="series", layout="NCDHW", shape=[4, 8, 8], channels=1,
                      normalisation="range", min=-1000, max=400,
                      standardise={"mean": [0.5], "std": [0.25]})
    slices = np.random.default_rng(1).random((4, 8, 8, 1), dtype=np.float32)
    volume = np.asarray(volume_batch(slices, spec))
    np.testing.assert_allclose(volume[0, 0], (slices[..., 0] - 0.5) / 0.25, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize(("fields", "says"), [
    ({"normalisation": "zscore", "standardise": {"mean": [0.5], "std": [0.2]}},
     "follows a window or range"),
    ({"standardise": {"mean": [0.4, 0.5], "std": [0.2, 0.2]}}, "2 means for 3 channel(s)"),
    ({"standardise": {"mean": [0.4, 0.5, 0.6], "std": [0.2]}}, "1 values for 3 means"),
])
def test_a_standardisation_that_cannot_apply_is_refused_naming_it(fields: dict,
                                                                  says: str) -> None:
    with pytest.raises(ValidationError, match="standardise") as caught:
        ModelInput.model_validate({"level": "image", "layout": "NHWC", "shape": [8, 8],
                                   "channels": 3, **fields})
    assert says in str(caught.value)
