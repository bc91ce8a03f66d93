"""DICOM to model input: decode, modality/VOI LUT, MONOCHROME1, colour, intensity scaling,
shrink, resize, channels and layout."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import tensorflow as tf
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from models.manifest import Intensity, ModelInput, Window

GREY = frozenset({"MONOCHROME1", "MONOCHROME2"})
# pydicom decodes these to RGB (as_rgb=True); JPEG 2000 RCT/ICT come out as RGB already.
COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420"})
PALETTE = "PALETTE COLOR"

_NATIVE_LITTLE_ENDIAN = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
# Errors pydicom and its plugins raise for pixel data they cannot turn into an array.
_DECODE_ERRORS = (RuntimeError, ValueError, NotImplementedError, AttributeError, KeyError)
DEFER_BYTES = 64 * 1024  # values this large (the pixel data) stay in the file until used


class PreprocessError(Exception):
    """An image that cannot become model input, naming the file so the study can be traced."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _read(path: Path, **options: Any) -> Dataset:
    """`pydicom.dcmread` with these options, or a `PreprocessError` naming the file."""
    try:
        return pydicom.dcmread(path, **options)
    except (InvalidDicomError, OSError, EOFError) as error:
        raise PreprocessError(path, f"not a readable DICOM file ({error})") from error


def read_header(path: Path) -> Dataset:
    """The dataset without pixel data, or a `PreprocessError` naming the file."""
    return _read(path, stop_before_pixels=True)


def _window_of(ds: Dataset, window: Window | str) -> tuple[float, float] | None:
    """(centre, width) to apply: the manifest's, else the dataset's first, else None (min/max)."""
    if isinstance(window, Window):
        return window.center, window.width
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        return _first_number(center), _first_number(width)
    except (TypeError, ValueError, IndexError):
        return None


def _first_number(value: object) -> float:
    """The first value of a possibly multi-valued DICOM number."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]


def _shrink_factor(rows: int, columns: int, target: Sequence[int] | None) -> int:
    """The integer factor k that keeps a frame at least the target size (1: leave it)."""
    if target is None:
        return 1
    return max(1, min(rows // int(target[0]), columns // int(target[1])))


def _block_sum(frame: np.ndarray, k: int) -> np.ndarray:
    """Sums of k x k blocks as float32 (a few edge pixels beyond a multiple of k are cut).

    Averaging down on the raw values first makes windowing and the in-graph resize cheap.
    """
    if k == 1:
        return frame.astype(np.float32, copy=False)
    rows, columns = frame.shape[0] // k * k, frame.shape[1] // k * k
    total = frame[0:rows:k, 0:columns:k].astype(np.float32)
    for i in range(k):
        for j in range(k):
            if i or j:
                total += frame[i:rows:k, j:columns:k]
    return total


def _scaled(values: np.ndarray, intensity: Intensity) -> np.ndarray:
    """Modality values (float32, changed in place) scaled by a `range`, `zscore` or `none`
    normalisation; a zscore without a given mean and std measures them on `values`."""
    method = intensity.normalisation
    if method == "range":
        low, high = float(intensity.min), float(intensity.max)  # type: ignore[arg-type]
        np.clip(values, low, high, out=values)
        values -= np.float32(low)
        values *= np.float32(1.0 / (high - low))
    elif method == "zscore":
        mean = float(values.mean()) if intensity.mean is None else intensity.mean
        std = float(values.std()) if intensity.std is None else intensity.std
        values -= np.float32(mean)
        values *= np.float32(1.0 / std if std > 0 else 1.0)
    return values


def _grey(raw: np.ndarray, ds: Dataset, intensity: Intensity, k: int) -> np.ndarray:
    """Modality LUT and a linear VOI window fused into one float32 affine, clipped to [0, 1];
    or, for the other normalisations, the modality values scaled by `_scaled`."""
    if "ModalityLUTSequence" in ds:
        raw, slope, intercept = apply_modality_lut(raw, ds).astype(np.float32), 1.0, 0.0
    else:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    values = _block_sum(raw, k)
    slope /= k * k
    inverted = ds.PhotometricInterpretation == "MONOCHROME1"
    if intensity.normalisation != "window":
        values *= np.float32(slope)
        values += np.float32(intercept)
        values = _scaled(values, intensity)
        if inverted and intensity.normalisation == "range":
            np.subtract(np.float32(1.0), values, out=values)
        return values[..., np.newaxis]
    chosen = _window_of(ds, intensity.window)
    if chosen is None:
        low, high = sorted((float(values.min()) * slope + intercept,
                            float(values.max()) * slope + intercept))
    else:
        center, width = chosen
        low = center - 0.5 - (width - 1.0) / 2.0
        high = center - 0.5 + (width - 1.0) / 2.0
    span = max(high - low, 1e-3)
    values *= np.float32(slope / span)
    values += np.float32((intercept - low) / span)
    np.clip(values, 0.0, 1.0, out=values)
    if inverted:
        np.subtract(np.float32(1.0), values, out=values)
    return values[..., np.newaxis]


def _colour(raw: np.ndarray, ds: Dataset, intensity: Intensity, k: int) -> np.ndarray:
    """RGB (pydicom already converted YBR) scaled by the stored bit depth to [0, 1] (for a
    window); for the other normalisations the stored values scaled by `_scaled`."""
    if ds.PhotometricInterpretation == PALETTE:
        raw = apply_color_lut(raw, ds)
        top = float(np.iinfo(raw.dtype).max) if raw.dtype.kind in "ui" else 1.0
    else:
        top = float(2 ** int(ds.get("BitsStored", 8)) - 1)
    values = _block_sum(raw, k)
    if intensity.normalisation != "window":
        values *= np.float32(1.0 / (k * k))
        return _scaled(values, intensity)
    values *= np.float32(1.0 / (top * k * k))
    return values


def _native_grey(ds: Dataset) -> np.ndarray | None:
    """A view of uncompressed single-frame 16-bit grey pixel data without pydicom's general
    decoder (a third of the decode time of a CT slice); None where the fast path does not apply.

    Only where no bit fiddling is needed: little endian, unsigned (high bits above BitsStored
    are cleared here), or signed with all 16 bits stored.
    """
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if (
        syntax not in _NATIVE_LITTLE_ENDIAN
        or ds.get("BitsAllocated") != 16
        or ds.get("SamplesPerPixel", 1) != 1
        or int(ds.get("NumberOfFrames") or 1) != 1
        or "PixelData" not in ds
    ):
        return None
    rows, columns = int(ds.Rows), int(ds.Columns)
    signed, stored = ds.get("PixelRepresentation") == 1, int(ds.get("BitsStored", 16))
    if signed and stored != 16:
        return None
    data = ds.PixelData
    if len(data) < rows * columns * 2:
        return None  # let pydicom explain what is wrong
    raw = np.frombuffer(data, dtype="<i2" if signed else "<u2", count=rows * columns)
    raw = raw.reshape(rows, columns)
    return raw if signed or stored == 16 else raw & np.uint16((1 << stored) - 1)


def read_dataset(path: Path, *, pixels: bool = True) -> Dataset:
    """The whole dataset (or, without `pixels`, all before the pixel data), or a
    `PreprocessError` naming the file."""
    return _read(path, stop_before_pixels=not pixels)


def read_deferred(path: Path) -> Dataset:
    """The dataset with its pixel data left in the file until first used (a `PreprocessError`
    naming the file when it cannot be read): headers first, pixels only where needed."""
    return _read(path, defer_size=DEFER_BYTES)


def _intensity(scaling: Intensity | Window | str) -> Intensity:
    """A window (or "auto") as the intensity scaling it stands for."""
    if isinstance(scaling, Intensity):
        return scaling
    return Intensity(normalisation="window", window=scaling)  # type: ignore[arg-type]


def decode_dataset(
    path: Path,
    ds: Dataset,
    window: Intensity | Window | str = "auto",
    target: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Every frame of a dataset as float32 (rows, columns, 1 or 3), in frame order: in [0, 1]
    for a window (the seed models'), else as the `Intensity` given scales it.

    With `target` (the model's input rows and columns) frames at least twice the target are
    averaged down by an integer factor; the exact resize is `to_model_input`'s, batched.
    """
    intensity = _intensity(window)
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise PreprocessError(path, "no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in GREY | COLOUR | {PALETTE}:
        raise PreprocessError(path, f"unsupported photometric interpretation {photometric!r}")
    try:
        raw = _native_grey(ds)
        raw = pixel_array(ds, as_rgb=True) if raw is None else raw
    except _DECODE_ERRORS as error:
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown transfer syntax")
        name = getattr(syntax, "name", syntax)
        raise PreprocessError(path, f"pixel data cannot be decoded ({name}): {error}") from error
    frames = int(ds.get("NumberOfFrames") or 1)
    colour = photometric in COLOUR or photometric == PALETTE
    expected_dims = (3 if colour and photometric != PALETTE else 2) + (1 if frames > 1 else 0)
    if raw.ndim != expected_dims:
        raise PreprocessError(path, f"pixel array has shape {raw.shape} for {photometric}")
    stack = raw if frames > 1 else raw[np.newaxis]
    k = _shrink_factor(stack.shape[1], stack.shape[2], target)
    if colour:
        return [_colour(frame, ds, intensity, k) for frame in stack]
    return [_grey(frame, ds, intensity, k) for frame in stack]


def decode_frames(
    path: Path, window: Intensity | Window | str = "auto", target: Sequence[int] | None = None
) -> list[np.ndarray]:
    """Read a file and decode every frame; see `decode_dataset`."""
    return decode_dataset(path, read_dataset(path), window, target)


def to_model_input(
    images: tf.Tensor | np.ndarray, input_shape: Sequence[int], channels: int = 3
) -> tf.Tensor:
    """A batch of same-sized decoded frames resized with padding (aspect kept) to the model's
    input, grey replicated to three channels (or colour made grey for one); frames come
    pre-shrunk, so no antialiasing."""
    rows, columns = int(input_shape[0]), int(input_shape[1])
    batch = tf.image.resize_with_pad(images, rows, columns)
    if batch.shape[-1] == 1 and channels == 3:
        return tf.image.grayscale_to_rgb(batch)
    if batch.shape[-1] == 3 and channels == 1:
        return tf.image.rgb_to_grayscale(batch)
    return batch


def _standardised(batch: tf.Tensor, spec: ModelInput) -> tf.Tensor:
    """Channels last: each channel less its mean over its std, where the manifest asks."""
    if spec.standardise is None:
        return batch
    mean = tf.constant(spec.standardise.mean, tf.float32)
    return (batch - mean) / tf.constant(spec.standardise.std, tf.float32)


def image_batch(images: tf.Tensor | np.ndarray, spec: ModelInput) -> tf.Tensor:
    """Decoded frames (N, rows, columns, 1 or 3) as an image model's input batch: padded
    resize, channels, standardisation, layout (NHWC or NCHW) and dtype."""
    batch = _standardised(to_model_input(images, spec.shape, spec.channels), spec)
    if spec.layout == "NCHW":
        batch = tf.transpose(batch, [0, 3, 1, 2])
    return tf.cast(batch, spec.dtype)


def volume_batch(slices: tf.Tensor | np.ndarray, spec: ModelInput) -> tf.Tensor:
    """A resampled volume's slices (depth, rows, columns, 1 or 3) as a series model's input
    batch of one: padded resize of each slice, channels, standardisation, layout (NDHWC or
    NCDHW), dtype."""
    volume = _standardised(to_model_input(slices, spec.shape[1:], spec.channels), spec)
    volume = volume[tf.newaxis]
    if spec.layout == "NCDHW":
        volume = tf.transpose(volume, [0, 4, 1, 2, 3])
    return tf.cast(volume, spec.dtype)


def preprocess_file(
    path: Path, input_shape: Sequence[int], window: Window | str = "auto"
) -> np.ndarray:
    """All frames of one file as model input (frames, rows, columns, 3), for training and tests;
    the same steps as inference."""
    frames = decode_frames(path, window, input_shape)
    return np.stack([to_model_input(frame[np.newaxis], input_shape)[0] for frame in frames])
