"""A whole series as one volume: slices in patient-axis order, resampled at their real positions
(uneven spacing, gaps, duplicates), to a fixed depth or a spacing in mm, in either layout."""

from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.examples import volume_onnx
from models.manifest import ModelInput
from models.phantom import INTERCEPT, write_series
from models.preprocess import PreprocessError
from models.registry import load_model
from models.volume import fit_depth, infer_volume, read_volume, resample, target_positions
from tests.unit.models.conftest import MakeFolder


def _volume_input(**changes: object) -> dict:
    fields = {"level": "series", "layout": "NDHWC", "shape": [8, 16, 16], "channels": 1,
              "normalisation": "none"}
    return {**fields, **changes}


def _series_at(tmp_path: Path, positions: list[float], values: list[float] | None = None
               ) -> list[Path]:
    """One 16x16 slice per position, every pixel of a slice holding its value (in HU; by
    default its z)."""
    paths = write_series(tmp_path / "series", slices=len(positions), rows=16, cols=16, seed=2)
    for path, z, value in zip(paths, positions, values or positions, strict=True):
        ds = pydicom.dcmread(path)
        x, y, _ = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y, z]
        ds.PixelData = np.full((16, 16), value - INTERCEPT, np.uint16).tobytes()
        ds.save_as(path)
    return paths


def test_slices_are_interpolated_at_their_real_positions_across_a_gap() -> None:
    positions = np.array([0.0, 1.0, 2.0, 6.0, 7.0])
    stack = positions.reshape(-1, 1, 1, 1).astype(np.float32)
    targets = np.array([0.0, 1.5, 4.0, 6.5, 7.0])
    np.testing.assert_allclose(resample(stack, positions, targets)[:, 0, 0, 0], targets)


def test_a_spacing_in_mm_sets_the_slices_and_depth_pads_or_crops_evenly() -> None:
    spec = ModelInput.model_validate(_volume_input(spacing_mm=2.5))
    np.testing.assert_allclose(target_positions(np.array([10.0, 20.0]), spec),
                               [10.0, 12.5, 15.0, 17.5, 20.0])
    stack = np.arange(5, dtype=np.float32).reshape(5, 1, 1, 1) + 1
    assert fit_depth(stack, 3)[:, 0, 0, 0].tolist() == [2, 3, 4]
    assert fit_depth(stack, 8)[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5, 0, 0]


def test_a_series_with_uneven_spacing_becomes_evenly_spaced_slices(
    tmp_path: Path, file_folder: MakeFolder
) -> None:
    folder = file_folder("vol", volume_onnx(tmp_path / "vol.onnx", "NDHWC", depth=8),
                         input=_volume_input())
    paths = _series_at(tmp_path, [0.0, 1.0, 5.0, 6.0, 14.0])
    volume = read_volume(list(reversed(paths)), load_model(folder))
    assert volume.batch.shape == (1, 8, 16, 16, 1)
    np.testing.assert_allclose(volume.batch[0, :, 8, 8, 0], np.linspace(0.0, 14.0, 8),
                               atol=1e-3)
    assert [ref.path for ref in volume.rows] == paths
    assert volume.ordering.method == "position" and volume.ordering.gaps


def test_both_layouts_give_the_same_answer_on_the_same_series(
    tmp_path: Path, file_folder: MakeFolder
) -> None:
    paths = write_series(tmp_path / "ct", slices=6, rows=40, cols=40, lesion=True, seed=5)
    answers = []
    for layout in ("NCDHW", "NDHWC"):
        model_file = volume_onnx(tmp_path / f"{layout}.onnx", layout)
        folder = file_folder(layout.lower(), model_file, input=_volume_input(
            layout=layout, normalisation="range", min=-1000, max=400))
        result = infer_volume(paths, load_model(folder))
        assert len(result.rows) == 6 and result.probabilities.shape == (2,)
        answers.append(result.probabilities)
    np.testing.assert_allclose(answers[0], answers[1], rtol=1e-5)


def test_a_series_of_two_slices_is_no_volume(tmp_path: Path, file_folder: MakeFolder) -> None:
    folder = file_folder("vol", volume_onnx(tmp_path / "vol.onnx", "NDHWC"),
                         input=_volume_input())
    with pytest.raises(PreprocessError, match="at least 3 slices at distinct positions"):
        infer_volume(_series_at(tmp_path, [0.0, 5.0]), load_model(folder))


def test_duplicate_positions_count_once(tmp_path: Path, file_folder: MakeFolder) -> None:
    folder = file_folder("vol", volume_onnx(tmp_path / "vol.onnx", "NDHWC", depth=3),
                         input=_volume_input(shape=[3, 16, 16]))
    paths = _series_at(tmp_path, [0.0, 2.0, 2.0, 4.0], values=[0.0, 1.0, 3.0, 4.0])
    volume = read_volume(paths, load_model(folder))
    np.testing.assert_allclose(volume.batch[0, :, 0, 0, 0], [0.0, 2.0, 4.0], atol=1e-3)
    assert volume.ordering.duplicates


def test_only_the_slices_the_resampling_uses_are_decoded(
    tmp_path: Path, file_folder: MakeFolder
) -> None:
    paths = _series_at(tmp_path, [float(z) for z in range(11)])
    broken = pydicom.dcmread(paths[3])
    broken.PixelData = b"\0" * 10  # undecodable: harmless while nothing reads it
    broken.save_as(paths[3])
    shallow = file_folder("shallow", volume_onnx(tmp_path / "d3.onnx", "NDHWC", depth=3),
                          input=_volume_input(shape=[3, 16, 16]))
    volume = read_volume(paths, load_model(shallow))  # made at z 0, 5 and 10
    np.testing.assert_allclose(volume.batch[0, :, 0, 0, 0], [0.0, 5.0, 10.0], atol=1e-3)
    assert len(volume.rows) == 11, "the volume still names every slice of the series"

    deep = file_folder("deep", volume_onnx(tmp_path / "d11.onnx", "NDHWC", depth=11),
                       input=_volume_input(shape=[11, 16, 16]))
    with pytest.raises(PreprocessError, match="pixel data") as refused:
        read_volume(paths, load_model(deep))
    assert refused.value.path == paths[3]


@pytest.mark.parametrize("spacing_mm", [None, 0.7, 3.0])
def test_a_volume_from_the_slices_used_equals_one_from_every_slice(
    tmp_path: Path, file_folder: MakeFolder, spacing_mm: float | None
) -> None:
    positions = [0.0, 0.5, 2.0, 2.0, 3.5, 7.0, 7.4, 9.0, 12.0, 12.5]
    values = [0.0, 2.0, 6.0, 11.0, 10.0, 21.0, 22.0, 27.0, 36.0, 38.0]  # whole HU: as stored
    paths = _series_at(tmp_path, positions, values)
    folder = file_folder("vol", volume_onnx(tmp_path / "vol.onnx", "NDHWC", depth=6),
                         input=_volume_input(shape=[6, 16, 16], spacing_mm=spacing_mm))
    model = load_model(folder)
    distinct = np.array(sorted(set(positions)))
    slices = [np.mean([v for z, v in zip(positions, values, strict=True) if z == d])
              for d in distinct]
    stack = np.array(slices, dtype=np.float32).reshape(-1, 1, 1, 1)
    expected = fit_depth(resample(stack, distinct, target_positions(distinct, model.manifest
                                                                      .reads)), 6)
    volume = read_volume(paths, model)
    np.testing.assert_allclose(volume.batch[0, :, 0, 0, 0], expected[:, 0, 0, 0], atol=1e-3)


def test_a_measured_zscore_takes_its_mean_and_spread_from_every_slice(
    tmp_path: Path, file_folder: MakeFolder
) -> None:
    positions = [float(z) for z in range(11)]
    folder = file_folder("vol", volume_onnx(tmp_path / "vol.onnx", "NDHWC", depth=3),
                         input=_volume_input(shape=[3, 16, 16], normalisation="zscore"))
    volume = read_volume(_series_at(tmp_path, positions), load_model(folder))
    expected = (np.array([0.0, 5.0, 10.0]) - np.mean(positions)) / np.std(positions)
    np.testing.assert_allclose(volume.batch[0, :, 0, 0, 0], expected, atol=1e-4)
