"""Grad-CAM heatmaps over a CNN's last convolution, and overlays at the source image's size.

Explainability only: the map shows where the last convolution's features pushed the class
score up, so a reader can see whether the model looked at the lesion or at the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import keras
import numpy as np
import tensorflow as tf

from models.manifest import Manifest
from models.preprocess import _shrink_factor, decode_dataset, image_batch, read_dataset

DEFAULT_ALPHA = 0.4

# Jet-like colormap: (position, red, green, blue) control points, linearly interpolated.
_JET = np.array(
    [
        (0.000, 0.0, 0.0, 0.5),
        (0.125, 0.0, 0.0, 1.0),
        (0.375, 0.0, 1.0, 1.0),
        (0.625, 1.0, 1.0, 0.0),
        (0.875, 1.0, 0.0, 0.0),
        (1.000, 0.5, 0.0, 0.0),
    ],
    dtype=np.float32,
)


class HasModel(Protocol):
    """What a heatmap needs of a loaded model (a `models.registry.LoadedModel` fits)."""

    @property
    def manifest(self) -> Manifest: ...

    @property
    def model(self) -> keras.Model: ...


def last_conv_layer(model: keras.Model) -> keras.layers.Conv2D:
    """The last Conv2D: its maps are the finest ones that still see a class-level feature."""
    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.Conv2D):
            return layer
    raise ValueError(f"model {model.name!r} has no Conv2D layer for Grad-CAM; name the layer "
                     "to explain with [explain] layer")


def explain_layer(model: keras.Model, name: str | None = None) -> keras.layers.Layer:
    """The layer whose maps Grad-CAM weighs: the one named (a manifest's `[explain] layer`),
    else the last Conv2D; its output must be a channels-last map (batch, rows, columns, C)."""
    if name is None:
        layer = last_conv_layer(model)
    else:
        try:
            layer = model.get_layer(name)
        except ValueError as error:
            raise ValueError(f"model {model.name!r} has no top-level layer {name!r}") from error
    if isinstance(layer, keras.Model):
        raise ValueError(f"layer {layer.name!r} is a nested model, whose maps Grad-CAM cannot "
                         "reach: save the model flat (keras.Model(base.input, "
                         "head(base.output)))")
    shape = getattr(layer, "output", None)
    if shape is None or len(shape.shape) != 4:
        raise ValueError(f"layer {layer.name!r} does not give (batch, rows, columns, channels) "
                         "maps")
    return layer


def explainer(
    model: keras.Model, name: str | None = None
) -> tuple[keras.Model, keras.layers.Dense | None, keras.layers.Layer]:
    """What Grad-CAM runs: the sub-model giving the explained layer's maps and the class
    scores, the squashing head if any, and the layer; a ValueError saying why a model
    cannot be explained (checked when the model loads)."""
    target = explain_layer(model, name)
    scorer, head = _score_model(model, target)
    return scorer, head, target


def _score_model(
    model: keras.Model, target: keras.layers.Layer
) -> tuple[keras.Model, keras.layers.Dense | None]:
    """A sub-model giving (the target's maps, head input or output) and the softmax or
    sigmoid head, if any.

    Grad-CAM differentiates the class score before the activation (Selvaraju et al. 2017):
    a softmax or sigmoid saturates for confident images, and its gradient fades to nothing.
    """
    head = model.layers[-1]
    squashing = (keras.activations.softmax, keras.activations.sigmoid)
    if isinstance(head, keras.layers.Dense) and head.activation in squashing:
        return keras.Model(model.inputs, [target.output, head.input]), head
    return keras.Model(model.inputs, [target.output, model.output]), None


@dataclass(frozen=True)
class CellGrid:
    """Where the cells of a feature map sit in the input: cell (i, j) is centred on input
    pixel (offset[0] + stride[0] * i, offset[1] + stride[1] * j)."""

    offset: tuple[float, float]
    stride: tuple[float, float]


def _window_of(layer: keras.layers.Layer) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(effective kernel, strides) of a sliding-window layer; None for any other layer."""
    if isinstance(layer, keras.layers.Conv2D):
        kernel = tuple(
            d * (k - 1) + 1 for k, d in zip(layer.kernel_size, layer.dilation_rate, strict=True)
        )
        return (kernel[0], kernel[1]), (layer.strides[0], layer.strides[1])
    if isinstance(layer, keras.layers.MaxPooling2D | keras.layers.AveragePooling2D):
        return (layer.pool_size[0], layer.pool_size[1]), (layer.strides[0], layer.strides[1])
    return None


def cell_grid(model: keras.Model, target: keras.layers.Layer) -> CellGrid | None:
    """The receptive-field centres of a layer's cells, so the map is drawn where the cells
    look: valid convolutions and pooling shrink the map towards the middle of the input, and
    stretching it over the whole input would push hot spots outwards. None where a layer on
    the way changes the size in a way not known here (then the caller stretches)."""
    offset, stride = [0.0, 0.0], [1.0, 1.0]
    previous = None
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            previous = layer.output
            continue
        if previous is None or layer.input is not previous:
            return None  # branches (residual blocks): the cells' centres are not traced here
        previous = layer.output
        sizes = (tuple(layer.input.shape[1:3]), tuple(layer.output.shape[1:3]))
        window = _window_of(layer)
        if window is None:
            if sizes[0] != sizes[1]:
                return None
        else:
            for axis in (0, 1):
                kernel, step, size = window[0][axis], window[1][axis], sizes[0][axis]
                if size is None or layer.data_format != "channels_last":
                    return None
                before = 0
                if layer.padding == "same":
                    before = max((-(-size // step) - 1) * step + kernel - size, 0) // 2
                offset[axis] += stride[axis] * ((kernel - 1) / 2.0 - before)
                stride[axis] *= step
        if layer is target:
            return CellGrid((offset[0], offset[1]), (stride[0], stride[1]))
    return None


def _axis_weights(
    cells: int, grid_offset: float, grid_stride: float, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear sampling of `cells` values at each of `size` input pixel centres."""
    position = np.clip((np.arange(size) - grid_offset) / grid_stride, 0.0, cells - 1.0)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, cells - 1)
    return low, high, (position - low).astype(np.float32)


def upsample_cells(cells: np.ndarray, grid: CellGrid, size: Sequence[int]) -> np.ndarray:
    """(N, h, w) cell values drawn bilinearly onto (N, rows, columns) input pixels at their
    receptive-field centres, constant beyond the outermost centres."""
    r_low, r_high, r_t = _axis_weights(cells.shape[1], grid.offset[0], grid.stride[0], size[0])
    c_low, c_high, c_t = _axis_weights(cells.shape[2], grid.offset[1], grid.stride[1], size[1])
    rows = cells[:, r_low, :] * (1 - r_t)[None, :, None] + cells[:, r_high, :] * r_t[None, :, None]
    return (rows[:, :, c_low] * (1 - c_t) + rows[:, :, c_high] * c_t).astype(np.float32)


def gradcam(
    model: keras.Model, inputs: np.ndarray, class_index: int, layer: str | None = None
) -> np.ndarray:
    """Grad-CAM of one class for a batch, so the SR can show where the model looked.

    Parameters
    ----------
    model
        A Keras 2D CNN (the seed CNN of `models.cnn`, or any other, channels last).
    inputs
        Model input, float32 of shape (N, H, W, 3), as `models.preprocess.to_model_input`
        makes it.
    class_index
        Output whose score is explained.
    layer
        Name of the layer whose maps are weighed (`explain_layer`); default the last Conv2D.

    Returns
    -------
    numpy.ndarray
        float32 (N, H, W) in [0, 1]; each map is divided by its own maximum, and an image
        whose class score no feature raises gets a map of zeros. Cells are drawn at their
        receptive-field centres (`cell_grid`), not stretched over the input.
    """
    batch = np.asarray(inputs, dtype=np.float32)
    if batch.ndim != 4:
        raise ValueError(f"inputs must be (N, H, W, C), got shape {batch.shape}")
    classes = int(model.output.shape[-1])
    if not 0 <= class_index < classes:
        raise ValueError(f"class_index {class_index} outside the model's {classes} classes")
    scorer, head, target = explainer(model, layer)
    tensor = tf.constant(batch)
    with tf.GradientTape() as tape:
        maps, last = scorer(tensor, training=False)
        logits = last if head is None else tf.matmul(last, head.kernel) + head.bias
        score = logits[:, class_index]
    grads = tape.gradient(score, maps)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cells = tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1)).numpy()
    grid = cell_grid(model, target)
    if grid is None:
        cam = tf.image.resize(cells[..., np.newaxis], batch.shape[1:3])[..., 0].numpy()
    else:
        cam = upsample_cells(cells, grid, batch.shape[1:3])
    peak = cam.reshape(cam.shape[0], -1).max(axis=1).reshape(-1, 1, 1)
    scaled = np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def colormap(heatmap: np.ndarray) -> np.ndarray:
    """A jet-like RGB float image in [0, 1] for values in [0, 1], without matplotlib."""
    values = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    channels = [np.interp(values, _JET[:, 0], _JET[:, c]) for c in (1, 2, 3)]
    return np.stack(channels, axis=-1).astype(np.float32)


def overlay(grey: np.ndarray, heatmap: np.ndarray, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """The grey image with the coloured heatmap blended on top, as a reader views it.

    Parameters
    ----------
    grey
        (H, W) image in [0, 1] (windowed pixels).
    heatmap
        (H, W) map in [0, 1].
    alpha
        Weight of the heatmap colour; the image keeps ``1 - alpha``.

    Returns
    -------
    numpy.ndarray
        uint8 (H, W, 3) RGB.
    """
    grey = np.asarray(grey, dtype=np.float32)
    if grey.ndim != 2 or np.shape(heatmap) != grey.shape:
        raise ValueError(
            f"grey and heatmap must be the same 2-D shape, got {grey.shape} and "
            f"{np.shape(heatmap)}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    base = np.clip(grey, 0.0, 1.0)[..., np.newaxis]
    blended = (1.0 - alpha) * base + alpha * colormap(heatmap)
    return np.rint(np.clip(blended, 0.0, 1.0) * 255.0).astype(np.uint8)


@dataclass(frozen=True)
class PadGeometry:
    """Where `tf.image.resize_with_pad` put a (rows, columns) frame inside the model input."""

    top: int
    left: int
    rows: int
    columns: int

    @classmethod
    def of(cls, rows: int, columns: int, input_shape: Sequence[int]) -> PadGeometry:
        """The same float32 arithmetic as TensorFlow's resize_with_pad, so crops line up."""
        f32 = np.float32
        target_rows, target_columns = f32(input_shape[0]), f32(input_shape[1])
        ratio = max(f32(columns) / target_columns, f32(rows) / target_rows)
        resized_rows, resized_columns = f32(rows) / ratio, f32(columns) / ratio
        return cls(
            top=max(0, int(np.floor((target_rows - resized_rows) / f32(2)))),
            left=max(0, int(np.floor((target_columns - resized_columns) / f32(2)))),
            rows=int(np.floor(resized_rows)),
            columns=int(np.floor(resized_columns)),
        )


def to_source_grid(
    heatmap: np.ndarray, shrunk: tuple[int, int], factor: int, source: tuple[int, int]
) -> np.ndarray:
    """A model-input map cropped of its padding and resized back onto the source pixels.

    Preprocessing averaged k x k blocks (cutting the edge beyond a multiple of k) and then
    resized with padding; this undoes both, repeating the last row/column over the cut edge.
    """
    box = PadGeometry.of(shrunk[0], shrunk[1], heatmap.shape)
    crop = heatmap[box.top : box.top + box.rows, box.left : box.left + box.columns]
    covered = (shrunk[0] * factor, shrunk[1] * factor)
    resized = tf.image.resize(crop[..., np.newaxis], covered, method="bilinear")[..., 0].numpy()
    missing = (source[0] - covered[0], source[1] - covered[1])
    if missing[0] < 0 or missing[1] < 0:
        raise ValueError(f"shrunk frame {shrunk} x {factor} exceeds the source {source}")
    full = np.pad(resized, ((0, missing[0]), (0, missing[1])), mode="edge")
    return np.clip(full, 0.0, 1.0).astype(np.float32)


def _grey_of(frame: np.ndarray) -> np.ndarray:
    """A decoded (rows, columns, 1 or 3) frame as one grey channel for the overlay."""
    return frame[..., 0] if frame.shape[-1] == 1 else frame.mean(axis=-1)


def source_heatmap(
    loaded: HasModel, path: Path, class_index: int, frame: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The Grad-CAM map of one image on the source's pixel grid, with the image it explains.

    The model input is made exactly as inference makes it (same window, shrink and padded
    resize); the map is then mapped back onto the source's pixels, so it lines up with them.

    Parameters
    ----------
    loaded
        A CNN with its manifest (`models.registry.LoadedModel`).
    path
        The source DICOM file.
    class_index
        Index into ``loaded.manifest.classes``.
    frame
        1-based frame number of a multi-frame instance (as `SliceRef.frame`); None for a
        single-frame one.

    Returns
    -------
    tuple of numpy.ndarray
        (grey, heatmap): the windowed image and the map, float32 (Rows, Columns) in [0, 1].
    """
    manifest = loaded.manifest
    if manifest.level != "image":
        raise ValueError(f"model {manifest.name!r} is not a CNN reading images; Grad-CAM "
                         "needs one")
    spec = manifest.reads
    if spec.layout != "NHWC":
        raise ValueError(f"model {manifest.name!r} reads {spec.layout}; Grad-CAM needs NHWC")
    intensity, shape = spec.intensity, spec.shape
    ds = read_dataset(path)
    shrunk_frames = decode_dataset(path, ds, intensity, shape)
    index = 0 if frame is None else frame - 1
    if not 0 <= index < len(shrunk_frames):
        raise ValueError(f"{path}: frame {frame} outside 1..{len(shrunk_frames)}")
    shrunk = shrunk_frames[index]
    source = (int(ds.Rows), int(ds.Columns))
    factor = _shrink_factor(source[0], source[1], shape)  # the block size decode_dataset used
    inputs = np.asarray(image_batch(shrunk[np.newaxis], spec))
    layer = manifest.explain.layer if manifest.explain else None
    cam = gradcam(loaded.model, inputs, class_index, layer)[0]
    # The reader sees the image windowed, whatever scaling the model reads.
    shown = intensity if intensity.normalisation == "window" else "auto"
    full = shrunk if factor == 1 and shown is intensity else (
        decode_dataset(path, ds, shown, None)[index])
    return _grey_of(full), to_source_grid(cam, shrunk.shape[:2], factor, source)


def heatmap_overlay(
    loaded: HasModel,
    path: Path,
    class_index: int,
    frame: int | None = None,
    *,
    alpha: float = DEFAULT_ALPHA,
) -> np.ndarray:
    """The Grad-CAM overlay of one image at the source's resolution, for a Secondary Capture:
    uint8 (Rows, Columns, 3) RGB; arguments as `source_heatmap`."""
    grey, heatmap = source_heatmap(loaded, path, class_index, frame)
    return overlay(grey, heatmap, alpha)
