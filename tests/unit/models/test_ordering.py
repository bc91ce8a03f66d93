"""Slice order along the patient axis, with gaps and duplicates reported, not raised."""

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from models.ordering import order_slices
from models.phantom import write_series
from models.preprocess import PreprocessError


def test_slices_are_ordered_by_position_along_the_normal(tmp_path: Path) -> None:
    paths = write_series(tmp_path, slices=6, rows=16, cols=16)
    ordered = order_slices(list(reversed(paths)))
    assert [ref.path for ref in ordered.slices] == paths
    assert ordered.report.method == "position" and ordered.report.clean
    assert ordered.report.spacing_mm == pytest.approx(5.0)


def test_order_follows_the_normal_not_the_z_coordinate(tmp_path: Path) -> None:
    paths = write_series(tmp_path, slices=3, rows=16, cols=16)
    # Sagittal: the normal (row x column cosines) points along -x, so larger x comes first.
    for path, x in zip(paths, (0.0, 10.0, 5.0), strict=True):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [x, 0.0, 0.0]
        ds.save_as(path)
    assert [ref.path for ref in order_slices(paths).slices] == [paths[1], paths[2], paths[0]]
    assert order_slices(paths).report.spacing_mm == pytest.approx(5.0)


def test_missing_slice_is_reported_as_a_gap(tmp_path: Path) -> None:
    paths = write_series(tmp_path, slices=6, rows=16, cols=16)
    ordered = order_slices(paths[:3] + paths[4:])
    (gap,) = ordered.report.gaps
    assert gap.spacing_mm == pytest.approx(10.0) and gap.expected_mm == pytest.approx(5.0)


def test_duplicate_position_is_reported_not_raised(tmp_path: Path) -> None:
    paths = write_series(tmp_path, slices=4, rows=16, cols=16)
    ds = pydicom.dcmread(paths[2])
    ds.ImagePositionPatient = pydicom.dcmread(paths[1]).ImagePositionPatient
    ds.save_as(paths[2])
    report = order_slices(paths).report
    assert len(report.duplicates) == 1 and not report.clean


def test_without_positions_instance_number_orders(tmp_path: Path) -> None:
    paths = write_series(tmp_path, slices=4, rows=16, cols=16)
    for path in paths:
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(path)
    ordered = order_slices(list(reversed(paths)))
    assert ordered.report.method == "instance_number"
    assert [ref.instance_number for ref in ordered.slices] == [1, 2, 3, 4]


def test_mixed_image_sizes_raise_where_uniform_size_matters(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "a", slices=2, rows=16, cols=16)
    odd = write_series(tmp_path / "b", slices=1, rows=32, cols=32)
    assert len(order_slices(paths + odd).slices) == 3
    with pytest.raises(PreprocessError, match="image size 32x32 differs"):
        order_slices(paths + odd, uniform_size=True)


def test_multiframe_rows_carry_frame_numbers() -> None:
    ordered = order_slices([Path(get_testdata_file("SC_rgb_rle_2frame.dcm", download=False))])
    assert [ref.frame for ref in ordered.slices] == [1, 2]


def test_order_does_not_depend_on_the_order_files_are_given(tmp_path: Path) -> None:
    paths = write_series(tmp_path, slices=5, rows=16, cols=16)
    shuffled = [paths[i] for i in (3, 0, 4, 2, 1)]
    assert order_slices(shuffled).slices == order_slices(paths).slices
