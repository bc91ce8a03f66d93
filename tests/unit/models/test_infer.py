"""Inference over a series: per image in slice order, per series per LSTM, deterministic."""

from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.demo import DemoResult, write_series
from models.infer import (
    analyse_series,
    embed_files,
    infer_series,
    outputs_from_bytes,
    outputs_to_bytes,
)
from models.registry import Choice, Registry, SeriesInfo


@pytest.fixture(scope="module")
def registry(quick_demo: DemoResult) -> Registry:
    """The quick demo's models, loaded once."""
    return Registry.load(quick_demo.models_dir)


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    """A small phantom series with a lesion, files given in reverse slice order."""
    return list(reversed(write_series(tmp_path, slices=7, rows=40, cols=40, lesion=True, seed=5)))


def test_demo_series_selects_demo_cnn_with_its_lstm(registry: Registry, series: list[Path]) -> None:
    (choice,) = registry.select(SeriesInfo.from_files(series))
    assert choice.cnn.name == "demo-cnn"
    assert [lstm.name for lstm in choice.lstms] == ["demo-lstm"]


def test_rows_are_in_slice_order_with_sop_instance_uids(
    registry: Registry, series: list[Path]
) -> None:
    (result,) = analyse_series(series, registry)
    expected = [pydicom.dcmread(p).SOPInstanceUID for p in reversed(series)]
    assert [row.sop_instance_uid for row in result.rows] == expected
    assert all(row.frame is None for row in result.rows)
    assert result.image_probabilities.shape == (7, 2)
    assert result.embeddings.shape == (7, 512)
    np.testing.assert_allclose(result.image_probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert result.ordering.method == "position" and result.ordering.clean


def test_each_lstm_gives_one_probability_vector_for_the_series(
    registry: Registry, series: list[Path]
) -> None:
    (result,) = analyse_series(series, registry)
    (lstm,) = result.series
    assert lstm.manifest.name == "demo-lstm"
    assert lstm.probabilities.shape == (2,)
    assert lstm.probabilities.sum() == pytest.approx(1.0, rel=1e-5)


def test_same_input_gives_same_output(registry: Registry, series: list[Path]) -> None:
    (first,) = analyse_series(series, registry)
    (second,) = analyse_series(series, registry)
    np.testing.assert_array_equal(first.image_probabilities, second.image_probabilities)
    np.testing.assert_array_equal(first.embeddings, second.embeddings)
    np.testing.assert_array_equal(first.series[0].probabilities, second.series[0].probabilities)


def test_file_order_given_does_not_change_the_result(registry: Registry,
                                                     series: list[Path]) -> None:
    (given,) = analyse_series(series, registry)
    (reordered,) = analyse_series(list(reversed(series)), registry)
    assert given.rows == reordered.rows
    np.testing.assert_allclose(given.image_probabilities, reordered.image_probabilities,
                               atol=1e-6)
    np.testing.assert_allclose(given.series[0].probabilities, reordered.series[0].probabilities,
                               atol=1e-6)


def test_batch_size_does_not_change_the_result(registry: Registry, series: list[Path]) -> None:
    (choice,) = registry.select(SeriesInfo.from_files(series))
    whole = infer_series(series, choice, batch_size=32)
    split = infer_series(series, choice, batch_size=3)
    np.testing.assert_allclose(whole.image_probabilities, split.image_probabilities, atol=1e-5)


def test_lstm_reads_the_cnn_embeddings_in_slice_order(
    registry: Registry, series: list[Path]
) -> None:
    (choice,) = registry.select(SeriesInfo.from_files(series))
    result = infer_series(series, choice)
    (lstm,) = choice.lstms
    direct = lstm.predict(result.embeddings[np.newaxis])[0][0]
    np.testing.assert_allclose(result.series[0].probabilities, direct, rtol=1e-5)


def test_timing_is_reported(registry: Registry, series: list[Path]) -> None:
    (result,) = analyse_series(series, registry)
    assert result.timing.total_s >= result.timing.forward_s > 0.0
    assert result.timing.decode_s > 0.0


def test_series_no_model_applies_to_gives_no_results(registry: Registry, tmp_path: Path) -> None:
    paths = write_series(tmp_path, slices=2, rows=16, cols=16)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    assert analyse_series(paths, registry) == []


def test_multiframe_rows_carry_their_frame_numbers(registry: Registry) -> None:
    from pydicom.data import get_testdata_file

    path = Path(get_testdata_file("SC_rgb_rle_2frame.dcm", download=False))
    result = infer_series([path], Choice(registry.cnns[0]))
    assert [(row.sop_instance_uid, row.frame) for row in result.rows] == [
        (pydicom.dcmread(path).SOPInstanceUID, 1),
        (pydicom.dcmread(path).SOPInstanceUID, 2),
    ]
    assert result.series == ()


def _same(a, b) -> None:
    assert a.rows == b.rows
    np.testing.assert_array_equal(a.image_probabilities, b.image_probabilities)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    np.testing.assert_array_equal(a.series[0].probabilities, b.series[0].probabilities)


def test_outputs_kept_from_an_earlier_run_give_the_same_result_without_the_cnn(
    registry: Registry, series: list[Path]
) -> None:
    (choice,) = registry.select(SeriesInfo.from_files(series))
    first = infer_series(series, choice)
    kept = outputs_from_bytes(outputs_to_bytes(first.outputs))
    again = infer_series(series, choice, known=kept)
    _same(first, again)
    assert again.timing.forward_s == 0.0
    assert all(again.outputs[path] is kept[path] for path in series)


def test_a_file_whose_outputs_are_kept_is_not_read_again(
    registry: Registry, series: list[Path]
) -> None:
    """Its kept geometry orders the series: the bytes behind an unchanged stamp are not
    opened, not even for the header (here they are overwritten in place, same size and
    times, so reading them would fail)."""
    import os

    (choice,) = registry.select(SeriesInfo.from_files(series))
    first = infer_series(series, choice)
    kept = outputs_from_bytes(outputs_to_bytes(first.outputs))
    for path in series:
        times = path.stat()
        with path.open("r+b") as file:
            file.write(b"\0" * times.st_size)
        os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    again = infer_series(series, choice, known=kept)
    _same(first, again)
    assert again.ordering == first.ordering


def test_kept_outputs_keep_each_files_geometry(registry: Registry) -> None:
    """Multi-frame rows, positions and orientation come back as the file gave them."""
    from pydicom.data import get_testdata_file

    from models.ordering import geometry_of
    from models.preprocess import read_header

    paths = [Path(get_testdata_file(name, download=False))
             for name in ("SC_rgb_rle_2frame.dcm", "CT_small.dcm")]
    first = embed_files(paths, registry.cnns[0])
    kept = outputs_from_bytes(outputs_to_bytes(first.outputs))
    for path in paths:
        expected, got = geometry_of(path, read_header(path)), kept[path].geometry
        assert got.refs == expected.refs
        for a, b in zip((expected.orientation, *expected.positions),
                        (got.orientation, *got.positions), strict=True):
            assert (a is None and b is None) or np.array_equal(a, b)


def test_an_early_run_over_the_first_files_is_completed_by_the_analysis(
    registry: Registry, series: list[Path]
) -> None:
    (choice,) = registry.select(SeriesInfo.from_files(series))
    early = embed_files(series[:3], choice.cnn)
    assert early.files and set(early.outputs) == set(series[:3])
    completed = infer_series(series, choice, known=early.outputs)
    whole = infer_series(series, choice)
    assert completed.rows == whole.rows
    np.testing.assert_allclose(completed.image_probabilities, whole.image_probabilities,
                               atol=1e-5)
    np.testing.assert_allclose(completed.series[0].probabilities,
                               whole.series[0].probabilities, atol=1e-5)
    assert all(completed.outputs[path] is early.outputs[path] for path in series[:3])


def test_a_file_rewritten_since_its_outputs_were_kept_is_run_again(
    registry: Registry, series: list[Path]
) -> None:
    (choice,) = registry.select(SeriesInfo.from_files(series))
    kept = infer_series(series, choice).outputs
    changed = series[0]
    ds = pydicom.dcmread(changed)
    ds.pixel_array[:] = 0
    ds.PixelData = ds.pixel_array.tobytes()
    ds.SeriesDescription = "rewritten"  # a different length, whatever the clock says
    ds.save_as(changed)
    again = infer_series(series, choice, known=kept)
    assert again.outputs[changed] is not kept[changed]
    assert again.timing.forward_s > 0.0
    assert all(again.outputs[path] is kept[path] for path in series[1:])


def test_kept_outputs_of_a_multiframe_file_keep_their_frames(registry: Registry) -> None:
    from pydicom.data import get_testdata_file

    path = Path(get_testdata_file("SC_rgb_rle_2frame.dcm", download=False))
    first = infer_series([path], Choice(registry.cnns[0]))
    again = infer_series([path], Choice(registry.cnns[0]),
                         known=outputs_from_bytes(outputs_to_bytes(first.outputs)))
    assert again.rows == first.rows and again.timing.forward_s == 0.0
    np.testing.assert_array_equal(again.image_probabilities, first.image_probabilities)


def test_a_file_that_is_not_kept_outputs_is_refused_with_a_value_error() -> None:
    with pytest.raises(ValueError, match="not a file of CNN outputs"):
        outputs_from_bytes(b"PK\x03\x04 not really a zip")
