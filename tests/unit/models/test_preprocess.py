"""DICOM to model input, on pydicom's own test files and on small files made here."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import pixel_array

from models.manifest import Window
from models.phantom import write_series
from models.preprocess import (
    PreprocessError,
    _native_grey,
    decode_frames,
    preprocess_file,
    to_model_input,
)


def shipped(name: str) -> Path:
    """A file shipped inside pydicom (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not shipped with the installed pydicom"
    return Path(path)


def resaved(tmp_path: Path, name: str, **changes: object) -> Path:
    """A pydicom test file with some attributes changed, written to tmp."""
    ds = pydicom.dcmread(shipped(name))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    path = tmp_path / f"changed-{name}"
    ds.save_as(path)
    return path


def test_ct_gets_modality_lut_and_dataset_window() -> None:
    (frame,) = decode_frames(shipped("CT_small.dcm"), "auto")
    ds = pydicom.dcmread(shipped("CT_small.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    center, width = 40.0, 400.0
    expected = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(
        decode_frames(shipped("CT_small.dcm"), Window(center=center, width=width))[0][..., 0],
        expected,
        atol=1e-4,
    )
    assert frame.shape == (128, 128, 1) and frame.dtype == np.float32
    assert 0.0 <= frame.min() and frame.max() <= 1.0


def test_without_any_window_the_image_spans_min_to_max(tmp_path: Path) -> None:
    path = resaved(tmp_path, "MR_small.dcm", WindowCenter=None, WindowWidth=None)
    (frame,) = decode_frames(path, "auto")
    assert frame.min() == pytest.approx(0.0, abs=1e-6)
    assert frame.max() == pytest.approx(1.0, abs=1e-3)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    inverted = resaved(tmp_path, "MR_small.dcm", PhotometricInterpretation="MONOCHROME1")
    window = Window(center=600.0, width=1200.0)
    (normal,) = decode_frames(shipped("MR_small.dcm"), window)
    (flipped,) = decode_frames(inverted, window)
    np.testing.assert_allclose(flipped, 1.0 - normal, atol=1e-6)


def test_ybr_jpeg_is_converted_to_rgb_like_the_uncompressed_original() -> None:
    (ybr,) = decode_frames(shipped("SC_rgb_jpeg_dcmtk.dcm"))
    (rgb,) = decode_frames(shipped("SC_rgb_rle.dcm"))
    assert ybr.shape == rgb.shape == (100, 100, 3)
    assert np.mean(np.abs(ybr - rgb)) < 0.05  # lossy JPEG, same picture


def test_multiframe_is_split_into_frames() -> None:
    frames = decode_frames(shipped("examples_ybr_color.dcm"))
    assert len(frames) == 30
    assert frames[0].shape == (240, 320, 3)
    assert len(decode_frames(shipped("SC_rgb_rle_2frame.dcm"))) == 2


@pytest.mark.parametrize(
    "name",
    [
        "JPEG2000.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ],
)
def test_compressed_transfer_syntaxes_decode(name: str) -> None:
    (frame,) = decode_frames(shipped(name))
    assert frame.ndim == 3 and np.isfinite(frame).all()


def test_lossless_jpeg2000_matches_the_uncompressed_mr() -> None:
    np.testing.assert_allclose(
        decode_frames(shipped("MR_small_jp2klossless.dcm"))[0],
        decode_frames(shipped("MR_small.dcm"))[0],
        atol=1e-6,
    )


def test_undecodable_pixel_data_raises_naming_the_file() -> None:
    path = shipped("JPEG-lossy.dcm")  # a 12-bit JPEG Extended no installed plugin decodes
    with pytest.raises(PreprocessError) as caught:
        decode_frames(path)
    assert str(caught.value).startswith(f"{path}: pixel data cannot be decoded")


def test_unsupported_photometric_interpretation_raises(tmp_path: Path) -> None:
    path = resaved(tmp_path, "MR_small.dcm", PhotometricInterpretation="HSV")
    with pytest.raises(PreprocessError, match="unsupported photometric interpretation 'HSV'"):
        decode_frames(path)


def test_non_dicom_file_raises_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    with pytest.raises(PreprocessError, match="notes.txt: not a readable DICOM file"):
        decode_frames(path)


def test_resize_keeps_aspect_ratio_by_padding() -> None:
    tall = np.ones((1, 100, 50, 1), np.float32)
    (image,) = to_model_input(tall, (64, 64, 3)).numpy()
    assert image.shape == (64, 64, 3)
    assert image[:, :15].max() == 0.0 and image[:, -15:].max() == 0.0  # padded sides
    assert image[:, 20:44].min() > 0.99
    np.testing.assert_array_equal(image[..., 0], image[..., 2])  # grey in three channels


def test_preprocess_file_gives_float32_model_input_in_unit_range() -> None:
    images = preprocess_file(shipped("JPEG2000.dcm"), (224, 224, 3))
    assert images.shape == (1, 224, 224, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm",
                                  "MR_small_padded.dcm"])
def test_fast_native_path_gives_pydicoms_pixels(name: str) -> None:
    ds = pydicom.dcmread(shipped(name))
    fast = _native_grey(ds)
    assert fast is not None
    np.testing.assert_array_equal(fast, pixel_array(ds))


def test_fast_native_path_clears_bits_above_bits_stored(tmp_path: Path) -> None:
    (path,) = write_series(tmp_path, slices=1, rows=16, cols=16)
    ds = pydicom.dcmread(path)
    ds.PixelData = (np.full((16, 16), 0xF123, "<u2")).tobytes()  # overlay bits set above 12
    np.testing.assert_array_equal(_native_grey(ds), np.full((16, 16), 0x123))
