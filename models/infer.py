"""Series files to probabilities: per image (CNN) and per series (each LSTM on its embedding)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import tensorflow as tf

from models.manifest import Manifest
from models.ordering import FileGeometry, OrderReport, SliceRef, arrange, geometry_of
from models.preprocess import decode_dataset, read_dataset
from models.registry import Choice, Registry, SeriesInfo

DEFAULT_BATCH = 32
FIRST_BATCH = 8

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Timing:
    """Where the seconds went: decode is summed over reader threads, the rest is wall time."""

    total_s: float
    decode_s: float
    wait_s: float
    forward_s: float
    lstm_s: float


@dataclass(frozen=True)
class SeriesProbabilities:
    """One LSTM's class probabilities for the whole series (order of `manifest.classes`)."""

    manifest: Manifest
    probabilities: np.ndarray


@dataclass(frozen=True)
class SeriesResult:
    """A CNN's result on a series: one row per image (or frame) in slice order, plus its LSTMs."""

    cnn: Manifest
    rows: tuple[SliceRef, ...]
    image_probabilities: np.ndarray  # (rows, classes), float32
    embeddings: np.ndarray  # (rows, embedding_width), float32
    series: tuple[SeriesProbabilities, ...]
    ordering: OrderReport
    timing: Timing


def _prefetch(
    pool: ThreadPoolExecutor, work: Callable[[T], R], items: Sequence[T], depth: int
) -> Iterator[R]:
    """Results of `work` over `items` in order, keeping `depth` of them in flight ahead."""
    pending: deque[Future[R]] = deque()
    upcoming = iter(items)
    for item in upcoming:
        pending.append(pool.submit(work, item))
        if len(pending) >= depth:
            break
    while pending:
        result = pending.popleft().result()
        next_item = next(upcoming, None)
        if next_item is not None:
            pending.append(pool.submit(work, next_item))
        yield result


@dataclass(frozen=True)
class _Decoded:
    """One file read on a reader thread: its geometry, its frames and the seconds it took."""

    geometry: FileGeometry
    frames: list[np.ndarray]
    seconds: float


def _decoder(manifest: Manifest) -> Callable[[Path], _Decoded]:
    """The per-file work of a reader thread: read once, keep geometry, decode and shrink."""
    window, target = manifest.preprocessing.window, manifest.input_shape

    def decode(path: Path) -> _Decoded:
        start = time.perf_counter()
        ds = read_dataset(path)
        frames = decode_dataset(path, ds, window, target)
        return _Decoded(geometry_of(path, ds), frames, time.perf_counter() - start)

    return decode


def _batches(frames: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Consecutive frames stacked into batches, cut early where the frame shape changes; the
    first batch is small so the forward pass starts while the readers fill the pipeline."""
    batch: list[np.ndarray] = []
    limit = min(size, FIRST_BATCH)
    for frame in frames:
        if batch and (len(batch) == limit or frame.shape != batch[0].shape):
            yield np.stack(batch)
            batch, limit = [], size
        batch.append(frame)
    if batch:
        yield np.stack(batch)


class _Intake:
    """Frames in file arrival order, keeping each file's geometry and the reader's timings."""

    def __init__(self) -> None:
        self.files: list[FileGeometry] = []
        self.decode_s = 0.0
        self.wait_s = 0.0

    def frames(self, decoded: Iterator[_Decoded]) -> Iterator[np.ndarray]:
        """Every frame of every decoded file, in the order the files were given."""
        while True:
            start = time.perf_counter()
            item = next(decoded, None)
            self.wait_s += time.perf_counter() - start
            if item is None:
                return
            self.decode_s += item.seconds
            self.files.append(item.geometry)
            yield from item.frames


def _slice_order(files: list[FileGeometry], ordered: tuple[SliceRef, ...]) -> np.ndarray:
    """Indices that take rows from arrival order into slice order."""
    arrival = {(ref.path, ref.frame): index
               for index, ref in enumerate(ref for f in files for ref in f.refs)}
    return np.asarray([arrival[(ref.path, ref.frame)] for ref in ordered], dtype=np.int64)


def infer_series(
    paths: Sequence[Path], choice: Choice, *, batch_size: int = DEFAULT_BATCH, workers: int = 2
) -> SeriesResult:
    """Run a CNN over every image of a series, then each of its LSTMs in slice order.

    Reader threads read, decode and window the next files while the traced forward pass runs
    on the current batch (resizing happens batched inside the graph). Each file is read once;
    its geometry orders the rows afterwards, as the CNN sees every image on its own.
    """
    start = time.perf_counter()
    intake = _Intake()
    probabilities: list[np.ndarray] = []
    embeddings: list[np.ndarray] = []
    forward_s = 0.0
    files = list(dict.fromkeys(Path(path) for path in paths))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dicom-reader") as pool:
        decoded = _prefetch(pool, _decoder(choice.cnn.manifest), files,
                            depth=max(2 * batch_size, workers))
        for batch in _batches(intake.frames(decoded), batch_size):
            tick = time.perf_counter()
            batch_probabilities, batch_embedding = choice.cnn.forward(tf.constant(batch))
            probabilities.append(batch_probabilities.numpy())
            embeddings.append(batch_embedding.numpy())
            forward_s += time.perf_counter() - tick
    ordered = arrange(intake.files, uniform_size=bool(choice.lstms))
    order = _slice_order(intake.files, ordered.slices)
    width, classes = choice.cnn.manifest.embedding_width, len(choice.cnn.manifest.classes)
    image_probabilities = np.concatenate(probabilities or [np.zeros((0, classes), np.float32)])
    embedding = np.concatenate(embeddings or [np.zeros((0, width), np.float32)])
    image_probabilities, embedding = image_probabilities[order], embedding[order]
    tick = time.perf_counter()
    series = tuple(
        SeriesProbabilities(
            lstm.manifest, lstm.forward(tf.constant(embedding[np.newaxis])).numpy()[0]
        )
        for lstm in choice.lstms
        if embedding.shape[0] > 0
    )
    lstm_s = time.perf_counter() - tick
    timing = Timing(time.perf_counter() - start, intake.decode_s, intake.wait_s, forward_s,
                    lstm_s)
    return SeriesResult(
        choice.cnn.manifest, ordered.slices, image_probabilities, embedding, series,
        ordered.report, timing,
    )


def analyse_series(
    paths: Sequence[Path], registry: Registry, *, batch_size: int = DEFAULT_BATCH
) -> list[SeriesResult]:
    """Every applicable CNN (with its LSTMs) run over one series; empty when none applies."""
    info = SeriesInfo.from_files(paths)
    return [
        infer_series(paths, choice, batch_size=batch_size) for choice in registry.select(info)
    ]
