"""Grad-CAM maps and overlays: shape, range, determinism, and alignment with the source pixels."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from models.cnn import build_cnn
from models.demo import DemoResult, write_series
from models.gradcam import (
    CellGrid,
    PadGeometry,
    cell_grid,
    colormap,
    gradcam,
    heatmap_overlay,
    last_conv_layer,
    overlay,
    source_heatmap,
    to_source_grid,
    upsample_cells,
)
from models.manifest import Manifest
from models.registry import LoadedModel, load_model
from tests.unit.models.conftest import manifest_fields


@pytest.fixture(scope="module")
def tiny_cnn() -> keras.Model:
    """An untrained seed CNN small enough for shape tests."""
    keras.utils.set_random_seed(7)
    return build_cnn(3, (24, 24, 3), (4, 4, 4), 16, compile=False)


@pytest.fixture(scope="module")
def demo_cnn(quick_demo: DemoResult) -> LoadedModel:
    """The quick demo's trained CNN, loaded once."""
    return load_model(quick_demo.models_dir / "demo-cnn")


@pytest.fixture
def lesion_slices(tmp_path: Path) -> list[Path]:
    """A non-square phantom series with a lesion (40 rows, 56 columns)."""
    return write_series(tmp_path, slices=6, rows=40, cols=56, lesion=True, seed=3)


def test_map_has_the_input_size_and_lies_in_zero_one(tiny_cnn: keras.Model) -> None:
    inputs = np.random.default_rng(0).random((3, 24, 24, 3), dtype=np.float32)

    maps = gradcam(tiny_cnn, inputs, class_index=1)

    assert maps.shape == (3, 24, 24)
    assert maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0


def test_each_map_is_scaled_to_peak_at_one(tiny_cnn: keras.Model) -> None:
    inputs = np.random.default_rng(1).random((4, 24, 24, 3), dtype=np.float32)

    maps = gradcam(tiny_cnn, inputs, class_index=0)

    np.testing.assert_allclose(maps.reshape(4, -1).max(axis=1), 1.0, rtol=1e-6)


def test_same_input_gives_the_same_map(demo_cnn: LoadedModel, lesion_slices: list[Path]) -> None:
    first = heatmap_overlay(demo_cnn, lesion_slices[2], class_index=1)
    second = heatmap_overlay(demo_cnn, lesion_slices[2], class_index=1)

    np.testing.assert_array_equal(first, second)


def test_a_class_outside_the_model_is_refused(tiny_cnn: keras.Model) -> None:
    with pytest.raises(ValueError, match="class_index 3"):
        gradcam(tiny_cnn, np.zeros((1, 24, 24, 3), np.float32), class_index=3)


def test_a_model_without_convolution_is_refused() -> None:
    inputs = keras.Input((4, 4, 3))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inputs))

    with pytest.raises(ValueError, match="no Conv2D"):
        last_conv_layer(keras.Model(inputs, outputs))


def test_the_last_convolution_is_explained(tiny_cnn: keras.Model) -> None:
    assert last_conv_layer(tiny_cnn).name == "conv3"


def test_overlay_is_uint8_rgb_of_the_image_size() -> None:
    grey = np.linspace(0.0, 1.0, 30 * 20, dtype=np.float32).reshape(30, 20)

    rgb = overlay(grey, np.flipud(grey))

    assert rgb.shape == (30, 20, 3)
    assert rgb.dtype == np.uint8


def test_overlay_without_heatmap_weight_is_the_grey_image() -> None:
    grey = np.random.default_rng(2).random((8, 9), dtype=np.float32)

    rgb = overlay(grey, np.ones_like(grey), alpha=0.0)

    expected = np.rint(grey * 255).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)


def test_colormap_runs_from_blue_to_red() -> None:
    cold, hot = colormap(np.array([0.0, 1.0]))

    assert cold[2] > cold[0] and cold[2] > cold[1]
    assert hot[0] > hot[1] and hot[0] > hot[2]


def test_overlay_refuses_maps_of_another_size() -> None:
    with pytest.raises(ValueError, match="same 2-D shape"):
        overlay(np.zeros((4, 4)), np.zeros((4, 5)))


@pytest.mark.parametrize(
    ("rows", "columns", "size"),
    [(40, 56, 32), (56, 40, 32), (33, 97, 24), (64, 64, 64), (17, 29, 64)],
)
def test_pad_geometry_is_where_tensorflow_puts_the_image(rows: int, columns: int, size: int):
    padded = tf.image.resize_with_pad(np.ones((1, rows, columns, 1), np.float32), size, size)
    inside = np.argwhere(padded.numpy()[0, ..., 0] > 0)

    box = PadGeometry.of(rows, columns, (size, size, 3))

    assert (box.top, box.left) == tuple(inside.min(axis=0))
    assert (box.rows, box.columns) == tuple(inside.max(axis=0) - inside.min(axis=0) + 1)


def _block_mean(image: np.ndarray, k: int) -> np.ndarray:
    """What preprocessing's integer shrink does: k x k means, edge beyond a multiple cut."""
    rows, columns = image.shape[0] // k * k, image.shape[1] // k * k
    return image[:rows, :columns].reshape(rows // k, k, columns // k, k).mean(axis=(1, 3))


@pytest.mark.parametrize(("rows", "columns", "size"), [(40, 56, 32), (130, 90, 32), (70, 70, 32)])
def test_a_map_goes_back_onto_the_pixels_it_came_from(rows: int, columns: int, size: int):
    yy, xx = np.mgrid[0:rows, 0:columns]
    spot = (rows * 0.3, columns * 0.7)
    image = np.exp(-((yy - spot[0]) ** 2 + (xx - spot[1]) ** 2) / (2 * 4.0**2))
    image = image.astype(np.float32)
    k = max(1, min(rows // size, columns // size))
    shrunk = _block_mean(image, k)
    model_input = tf.image.resize_with_pad(shrunk[np.newaxis, ..., np.newaxis], size, size)

    back = to_source_grid(model_input.numpy()[0, ..., 0], shrunk.shape, k, (rows, columns))

    assert back.shape == (rows, columns)
    peak = np.unravel_index(np.argmax(back), back.shape)
    assert abs(peak[0] - spot[0]) <= max(2, k) and abs(peak[1] - spot[1]) <= max(2, k)
    assert np.corrcoef(back.ravel(), image.ravel())[0, 1] > 0.95


def test_overlay_has_the_source_resolution(demo_cnn: LoadedModel, lesion_slices: list[Path]):
    rgb = heatmap_overlay(demo_cnn, lesion_slices[0], class_index=0)

    assert rgb.shape == (40, 56, 3)
    assert rgb.dtype == np.uint8


def test_a_frame_the_file_lacks_is_refused(demo_cnn: LoadedModel, lesion_slices: list[Path]):
    with pytest.raises(ValueError, match="frame 2 outside 1..1"):
        heatmap_overlay(demo_cnn, lesion_slices[0], class_index=1, frame=2)


def test_an_lstm_has_no_heatmap(quick_demo: DemoResult, lesion_slices: list[Path]) -> None:
    lstm = SimpleNamespace(manifest=quick_demo.lstm, model=None)

    with pytest.raises(ValueError, match="not a CNN"):
        heatmap_overlay(lstm, lesion_slices[0], class_index=1)  # type: ignore[arg-type]


def test_cells_sit_at_their_receptive_field_centres(tiny_cnn: keras.Model) -> None:
    # 24 -> conv 22 -> pool 11 -> conv 9 -> pool 4 -> conv 2: centres 8.5 and 12.5
    assert cell_grid(tiny_cnn, last_conv_layer(tiny_cnn)) == CellGrid((8.5, 8.5), (4.0, 4.0))
    assert cell_grid(tiny_cnn, tiny_cnn.get_layer("conv1")) == CellGrid((1.0, 1.0), (1.0, 1.0))


def test_same_padding_keeps_cells_on_their_pixels() -> None:
    inputs = keras.Input((16, 16, 3))
    conv = keras.layers.Conv2D(2, 3, padding="same", name="conv")(inputs)
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(conv))
    model = keras.Model(inputs, outputs)

    assert cell_grid(model, model.get_layer("conv")) == CellGrid((0.0, 0.0), (1.0, 1.0))


def test_an_unknown_resizing_layer_falls_back_to_stretching() -> None:
    inputs = keras.Input((16, 16, 3))
    padded = keras.layers.ZeroPadding2D(2)(inputs)
    conv = keras.layers.Conv2D(2, 3, name="conv")(padded)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(conv)))

    assert cell_grid(model, model.get_layer("conv")) is None
    assert gradcam(model, np.ones((1, 16, 16, 3), np.float32), 0).shape == (1, 16, 16)


def test_a_hot_cell_is_drawn_on_its_centre() -> None:
    cells = np.zeros((1, 4, 4), np.float32)
    cells[0, 1, 2] = 1.0

    drawn = upsample_cells(cells, CellGrid((8.5, 8.5), (4.0, 4.0)), (32, 32))

    # centre (12.5, 16.5): the four pixels around it share the peak, 0.875 ** 2
    np.testing.assert_allclose(drawn[0, 12:14, 16:18], 0.765625)
    assert drawn[0].max() == pytest.approx(0.765625)


def _brightness_cnn(size: int) -> keras.Model:
    """A seed CNN whose last convolution measures local brightness and whose "bright" class
    score sums it: its Grad-CAM map must sit on the bright spot."""
    model = build_cnn(2, (size, size, 3), (1, 1, 1), 4, compile=False)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel, bias = layer.get_weights()
            layer.set_weights([np.full_like(kernel, 1.0 / kernel[..., 0].size), bias * 0])
        elif layer.name == "embedding":
            kernel, bias = layer.get_weights()
            layer.set_weights([np.full_like(kernel, 1.0 / kernel.shape[0]), bias * 0])
        elif isinstance(layer, keras.layers.Dense):
            kernel, bias = layer.get_weights()
            signs = np.stack([-np.ones(kernel.shape[0]), np.ones(kernel.shape[0])], axis=1)
            layer.set_weights([signs.astype(kernel.dtype), bias * 0])
    return model


def _spot_file(path: Path, rows: int, columns: int, *spots: tuple[int, int]) -> Path:
    """A 16-bit grey image, dark but for one small bright spot; a frame per spot."""
    yy, xx = np.mgrid[0:rows, 0:columns]
    frames = [
        100 + 3000 * np.exp(-((yy - spot[0]) ** 2 + (xx - spot[1]) ** 2) / 18.0)
        for spot in spots
    ]
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, uid, "CT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.PixelData = np.stack(frames).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _hot_centre(heatmap: np.ndarray) -> tuple[float, float]:
    """Centre of mass of the hottest part of a map."""
    hot = np.where(heatmap > 0.8, heatmap, 0.0)
    rows, columns = np.indices(heatmap.shape)
    return float((hot * rows).sum() / hot.sum()), float((hot * columns).sum() / hot.sum())


@pytest.fixture(scope="module")
def bright() -> SimpleNamespace:
    """The brightness CNN with a manifest, as a LoadedModel-like object."""
    fields = manifest_fields("bright", conv_filters=[1, 1, 1], embedding_width=4)
    fields["input_shape"] = [32, 32, 3]
    return SimpleNamespace(manifest=Manifest.model_validate(fields), model=_brightness_cnn(32))


@pytest.mark.parametrize(
    ("rows", "columns", "spot"),
    [(64, 96, (12, 80)), (96, 64, (80, 10)), (40, 40, (8, 30)), (130, 70, (20, 15))],
)
def test_the_map_lies_on_the_pixels_that_drove_the_score(tmp_path, bright, rows, columns, spot):
    path = _spot_file(tmp_path / "spot.dcm", rows, columns, spot)

    grey, heatmap = source_heatmap(bright, path, class_index=1)

    assert grey.shape == heatmap.shape == (rows, columns)
    centre = _hot_centre(heatmap)
    assert abs(centre[0] - spot[0]) <= 3 and abs(centre[1] - spot[1]) <= 3, centre


def test_the_frame_asked_for_is_the_one_explained(tmp_path, bright):
    spots = [(14, 14), (30, 20)]
    frames = _spot_file(tmp_path / "frames.dcm", 48, 48, *spots)

    for number, spot in enumerate(spots, start=1):
        alone = _spot_file(tmp_path / f"alone{number}.dcm", 48, 48, spot)
        _, expected = source_heatmap(bright, alone, class_index=1)
        _, heatmap = source_heatmap(bright, frames, class_index=1, frame=number)
        np.testing.assert_array_equal(heatmap, expected)
