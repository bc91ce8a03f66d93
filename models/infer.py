"""Series files to probabilities: per image (a CNN of any format) and per series (each LSTM on
its embedding); series-level models reading the whole volume are `models.volume`'s."""

from __future__ import annotations

import dataclasses
import io
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from models.loaded import LoadedModel
from models.manifest import Manifest
from models.ordering import (
    FileGeometry,
    OrderReport,
    SliceRef,
    arrange,
    file_refs,
    geometry_of,
)
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
    outputs: Mapping[Path, FileOutputs]  # per file, for a caller that keeps them for next time


@dataclass(frozen=True)
class FileOutputs:
    """A CNN's outputs for every frame of one file, which bytes of the file they are for, and
    its geometry: a file seen once is not read again to order the series."""

    stamp: str
    probabilities: np.ndarray  # (frames, classes), float32
    embeddings: np.ndarray  # (frames, embedding_width), float32
    geometry: FileGeometry


@dataclass(frozen=True)
class Embedded:
    """A CNN run over some files: each file's geometry (in the order given) and outputs."""

    files: tuple[FileGeometry, ...]
    outputs: dict[Path, FileOutputs]
    decode_s: float
    wait_s: float
    forward_s: float


def file_stamp(path: Path) -> str:
    """Size, modification time and inode: a replaced file (written anew, renamed into place)
    never keeps all three, so outputs made for its old bytes are never reused."""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _point(value: np.ndarray | None, size: int) -> np.ndarray:
    """A position or orientation as `size` floats, NaN where it is missing or malformed (which
    ordering treats alike)."""
    if value is None or value.shape != (size,):
        return np.full(size, np.nan)
    return value


def _geometry_arrays(geometries: list[FileGeometry]) -> dict[str, np.ndarray]:
    """Files' geometry as flat arrays: one row per file, and per frame for positions."""
    firsts = [g.refs[0] for g in geometries]
    return {
        "uids": np.array([ref.sop_instance_uid for ref in firsts], dtype=str),
        "numbers": np.array([-1 if ref.instance_number is None else ref.instance_number
                             for ref in firsts], dtype=np.int64),
        "numbered": np.array([ref.instance_number is not None for ref in firsts], dtype=bool),
        "sizes": np.array([(ref.rows, ref.columns) for ref in firsts], dtype=np.int64
                          ).reshape(-1, 2),
        "multiframe": np.array([ref.frame is not None for ref in firsts], dtype=bool),
        "orientations": np.array([_point(g.orientation, 6) for g in geometries]).reshape(-1, 6),
        "positions": np.array([_point(p, 3) for g in geometries for p in g.positions]
                              ).reshape(-1, 3),
    }


def _known_or_none(value: np.ndarray) -> np.ndarray | None:
    return None if np.isnan(value).any() else value


def _geometry(path: Path, arrays: Mapping[str, np.ndarray], at: int, start: int, frames: int
              ) -> FileGeometry:
    """File `at`'s geometry back from `_geometry_arrays`; its frames' positions from `start`."""
    rows, columns = (int(n) for n in arrays["sizes"][at])
    number = int(arrays["numbers"][at]) if arrays["numbered"][at] else None
    refs = file_refs(path, str(arrays["uids"][at]), number, rows, columns, frames,
                     bool(arrays["multiframe"][at]))
    positions = tuple(_known_or_none(p) for p in arrays["positions"][start:start + frames])
    return FileGeometry(refs, _known_or_none(arrays["orientations"][at]), positions)


def outputs_to_bytes(outputs: Mapping[Path, FileOutputs]) -> bytes:
    """Outputs as one .npz (no pickles), to keep beside a series for the next run."""
    items = list(outputs.items())
    buffer = io.BytesIO()
    np.savez(
        buffer,
        paths=np.array([str(path) for path, _ in items], dtype=str),
        stamps=np.array([o.stamp for _, o in items], dtype=str),
        counts=np.array([len(o.probabilities) for _, o in items], dtype=np.int64),
        probabilities=_stacked([o.probabilities for _, o in items]),
        embeddings=_stacked([o.embeddings for _, o in items]),
        **_geometry_arrays([o.geometry for _, o in items]),
    )
    return buffer.getvalue()


def _stacked(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


# The arrays of a kept file: one row per file, or one per frame (of all files, in order).
_PER_FILE = ("paths", "stamps", "counts", "uids", "numbers", "numbered", "sizes", "multiframe",
             "orientations")
_PER_FRAME = ("probabilities", "embeddings", "positions")


def outputs_from_bytes(data: bytes) -> dict[Path, FileOutputs]:
    """What `outputs_to_bytes` kept; ValueError if it is not such a file (or one kept before
    outputs carried their files' geometry)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in (*_PER_FILE, *_PER_FRAME)}
    except (OSError, KeyError, zipfile.BadZipFile) as error:
        raise ValueError(f"not a file of CNN outputs: {error}") from error
    counts = arrays["counts"]
    if {len(arrays[name]) for name in _PER_FILE} != {len(counts)} or any(
        len(arrays[name]) != counts.sum() for name in _PER_FRAME
    ):
        raise ValueError("a file of CNN outputs whose parts disagree")
    ends = np.cumsum(counts)
    return {
        Path(str(path)): FileOutputs(
            str(stamp), arrays["probabilities"][end - n:end], arrays["embeddings"][end - n:end],
            _geometry(Path(str(path)), arrays, at, int(end - n), int(n)),
        )
        for at, (path, stamp, n, end) in enumerate(
            zip(arrays["paths"], arrays["stamps"], counts, ends, strict=True)
        )
    }


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
    """One file read on a reader thread: its geometry, its frames (none when its outputs are
    already known) and the seconds it took."""

    path: Path
    geometry: FileGeometry
    frames: list[np.ndarray]
    stamp: str
    seconds: float


def _decoder(
    manifest: Manifest, known: Mapping[Path, FileOutputs]
) -> Callable[[Path], _Decoded]:
    """The per-file work of a reader thread: read once, keep geometry, decode and shrink;
    a file whose outputs are known and current is not read at all."""
    spec = manifest.reads
    intensity, target = spec.intensity, spec.shape

    def decode(path: Path) -> _Decoded:
        start = time.perf_counter()
        stamp = file_stamp(path)
        earlier = known.get(path)
        if earlier is not None and earlier.stamp == stamp:
            return _Decoded(path, earlier.geometry, [], stamp, time.perf_counter() - start)
        ds = read_dataset(path)
        frames = decode_dataset(path, ds, intensity, target)
        return _Decoded(path, geometry_of(path, ds), frames, stamp, time.perf_counter() - start)

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
        self.files: list[_Decoded] = []
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
            self.files.append(dataclasses.replace(item, frames=[]))  # frames go on, not kept
            yield from item.frames


def embed_files(
    paths: Sequence[Path],
    cnn: LoadedModel,
    *,
    batch_size: int = DEFAULT_BATCH,
    workers: int = 2,
    known: Mapping[Path, FileOutputs] | None = None,
) -> Embedded:
    """Run a CNN over every image of these files, reusing `known` outputs that are current.

    Reader threads read, decode and scale the next files while the forward pass runs on the
    current batch (resizing happens batched, in a traced step). Each file is read once.
    """
    known = known or {}
    intake = _Intake()
    probabilities: list[np.ndarray] = []
    embeddings: list[np.ndarray] = []
    forward_s = 0.0
    files = list(dict.fromkeys(Path(path) for path in paths))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dicom-reader") as pool:
        decoded = _prefetch(pool, _decoder(cnn.manifest, known), files,
                            depth=max(2 * batch_size, workers))
        for batch in _batches(intake.frames(decoded), batch_size):
            tick = time.perf_counter()
            batch_probabilities, batch_embedding = cnn.predict_images(batch)
            probabilities.append(batch_probabilities)
            embeddings.append(batch_embedding)
            forward_s += time.perf_counter() - tick
    width, classes = cnn.embedding_width, len(cnn.manifest.classes)
    new_probabilities = np.concatenate(probabilities or [np.zeros((0, classes), np.float32)])
    new_embeddings = np.concatenate(embeddings or [np.zeros((0, width), np.float32)])
    outputs: dict[Path, FileOutputs] = {}
    at = 0
    for item in intake.files:
        earlier = known.get(item.path)
        if earlier is not None and earlier.stamp == item.stamp:
            outputs[item.path] = earlier
            continue
        count = len(item.geometry.refs)
        outputs[item.path] = FileOutputs(
            item.stamp, new_probabilities[at:at + count], new_embeddings[at:at + count],
            item.geometry,
        )
        at += count
    return Embedded(tuple(item.geometry for item in intake.files), outputs, intake.decode_s,
                    intake.wait_s, forward_s)


def _rows(outputs: Mapping[Path, FileOutputs], ordered: tuple[SliceRef, ...],
          field: str) -> np.ndarray:
    """One output per row, in slice order (a frame's row is its 1-based frame number)."""
    return np.stack([getattr(outputs[ref.path], field)[(ref.frame or 1) - 1] for ref in ordered])


def infer_series(
    paths: Sequence[Path],
    choice: Choice,
    *,
    batch_size: int = DEFAULT_BATCH,
    workers: int = 2,
    known: Mapping[Path, FileOutputs] | None = None,
) -> SeriesResult:
    """Run a CNN over every image of a series (see `embed_files`), then each of its LSTMs in
    slice order; the geometry read with the pixels orders the rows afterwards, as the CNN
    sees every image on its own."""
    start = time.perf_counter()
    embedded = embed_files(paths, choice.cnn, batch_size=batch_size, workers=workers,
                           known=known)
    ordered = arrange(list(embedded.files), uniform_size=bool(choice.lstms))
    width, classes = choice.cnn.embedding_width, len(choice.cnn.manifest.classes)
    if ordered.slices:
        image_probabilities = _rows(embedded.outputs, ordered.slices, "probabilities")
        embedding = _rows(embedded.outputs, ordered.slices, "embeddings")
    else:
        image_probabilities = np.zeros((0, classes), np.float32)
        embedding = np.zeros((0, width), np.float32)
    tick = time.perf_counter()
    series = tuple(
        SeriesProbabilities(lstm.manifest, lstm.predict(embedding[np.newaxis])[0][0])
        for lstm in choice.lstms
        if embedding.shape[0] > 0
    )
    lstm_s = time.perf_counter() - tick
    timing = Timing(time.perf_counter() - start, embedded.decode_s, embedded.wait_s,
                    embedded.forward_s, lstm_s)
    return SeriesResult(
        choice.cnn.manifest, ordered.slices, image_probabilities, embedding, series,
        ordered.report, timing, embedded.outputs,
    )


def analyse_series(
    paths: Sequence[Path], registry: Registry, *, batch_size: int = DEFAULT_BATCH
) -> list[SeriesResult]:
    """Every applicable CNN (with its LSTMs) run over one series; empty when none applies."""
    info = SeriesInfo.from_files(paths)
    return [
        infer_series(paths, choice, batch_size=batch_size) for choice in registry.select(info)
    ]
