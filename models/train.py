"""Training from DICOM and labels.csv into a model folder (weights, manifest with sha256 and
validation metrics), split by patient so no patient is in both train and validation."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from models.cnn import build_cnn, compile_forward
from models.dataset import (
    LabelledFile,
    Labels,
    TrainingError,
    class_order,
    group_series,
    image_label,
    read_labels,
    scan_files,
    series_label,
    split_patients,
)
from models.infer import infer_series
from models.lstm import PADDING_VALUE, build_lstm, compile_sequence_forward
from models.manifest import (
    PRIVATE_SCHEME,
    ClassLabel,
    Code,
    Manifest,
    Preprocessing,
    Selection,
    Validation,
    Window,
    sha256_of,
    write_manifest,
)
from models.preprocess import preprocess_file
from models.registry import Choice, load_model

WEIGHTS_FILE = "model.weights.h5"
DEFAULT_EPOCHS = {"cnn": 10, "lstm": 40}


@dataclass(frozen=True)
class TrainOptions:
    """Choices for one training run; the defaults are the seed article's."""

    name: str | None = None  # default: the output folder's name
    version: str = "0.1.0"
    epochs: int | None = None
    batch_size: int = 32
    input_shape: tuple[int, int, int] = (224, 224, 3)
    window: Window | str = "auto"
    classes: tuple[ClassLabel, ...] | None = None  # default: private codes from the label names
    selection: Selection | None = None  # default: the modalities and SOP classes trained on
    intended_use: str = "Research use only: trained with pacs-ai models train; not validated."
    validation_fraction: float = 0.2
    seed: int = 0
    progress: bool = True
    workers: int = 2
    extra: dict[str, object] = field(default_factory=dict)  # further manifest fields


def _bar(options: TrainOptions, **kwargs: object) -> tqdm:
    """A progress bar that draws only on a terminal: in a log, frames would fill it."""
    return tqdm(disable=None if options.progress else True, **kwargs)  # None: off unless a tty


class _Progress(keras.callbacks.Callback):
    """A tqdm bar over all training batches, showing loss and accuracy; where there is no
    terminal to draw on (a log, a pipe), one line per epoch instead."""

    def __init__(self, bar: tqdm, label: str, epochs: int, lines: bool) -> None:
        super().__init__()
        self.bar = bar
        self.label = label
        self.epochs = epochs
        self.lines = lines and bar.disable

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """Advance the bar by one batch."""
        self.bar.update(1)
        if logs:
            self.bar.set_postfix(loss=f"{logs.get('loss', 0.0):.4f}",
                                 acc=f"{logs.get('accuracy', 0.0):.3f}")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Without a bar, say how the epoch ended."""
        if self.lines:
            logs = logs or {}
            print(f"training {self.label}: epoch {epoch + 1}/{self.epochs} "
                  f"loss {logs.get('loss', 0.0):.4f} accuracy {logs.get('accuracy', 0.0):.3f}",
                  file=sys.stderr, flush=True)


def _classes(found: Counter[str], options: TrainOptions) -> list[ClassLabel]:
    """The manifest's classes: the ones given, or one private code per label name."""
    if options.classes is None:
        return [
            ClassLabel(
                name=name,
                code=Code(scheme=PRIVATE_SCHEME, value=name.upper()[:64], meaning=name[:64]),
            )
            for name in class_order(found)
        ]
    unknown = set(found) - {label.name for label in options.classes}
    if unknown:
        raise TrainingError(f"labels {sorted(unknown)} are not among the given classes")
    return list(options.classes)


def _metrics(
    truth: np.ndarray, probabilities: np.ndarray, names: Sequence[str]
) -> tuple[dict[str, float], float]:
    """AUC per class (one against the rest, where both occur) and accuracy."""
    auc = {
        name: float(roc_auc_score(truth == index, probabilities[:, index]))
        for index, name in enumerate(names)
        if 0 < int(np.sum(truth == index)) < len(truth)
    }
    accuracy = float(np.mean(np.argmax(probabilities, axis=1) == truth))
    return auc, accuracy


def _fit(model: keras.Model, x: np.ndarray, y: np.ndarray, options: TrainOptions,
         epochs: int, label: str) -> None:
    """Fit with balanced class weights and a progress bar."""
    counts = np.bincount(y, minlength=model.output_shape[-1]).astype(np.float64)
    weights = {i: float(len(y) / (len(counts) * c)) for i, c in enumerate(counts) if c > 0}
    steps = -(-len(x) // options.batch_size) * epochs
    with _bar(options, total=steps, desc=f"training {label}") as bar:
        model.fit(
            x, keras.utils.to_categorical(y, model.output_shape[-1]),
            batch_size=options.batch_size, epochs=epochs, shuffle=True, verbose=0,
            class_weight=weights, callbacks=[_Progress(bar, label, epochs, options.progress)],
        )


def _save(model: keras.Model, out: Path, manifest_fields: dict) -> Manifest:
    """Write the weights, then the manifest carrying their SHA-256."""
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    # The same layers in an uncompiled model: the file holds weights, no optimizer state.
    keras.Model(model.inputs, model.outputs).save_weights(weights)
    manifest = Manifest.model_validate(
        {**manifest_fields, "weights_file": WEIGHTS_FILE, "weights_sha256": sha256_of(weights)}
    )
    write_manifest(manifest, out)
    return manifest


def _common_fields(out: Path, kind: str, classes: list[ClassLabel], files: list[LabelledFile],
                   options: TrainOptions) -> dict:
    """Manifest fields shared by both kinds."""
    selection = options.selection or Selection(
        modalities=sorted({f.modality for f in files if f.modality}),
        sop_class_uids=sorted({f.sop_class_uid for f in files if f.sop_class_uid}),
    )
    return {
        "name": options.name or out.name,
        "version": options.version,
        "kind": kind,
        "classes": [label.model_dump() for label in classes],
        "selection": selection.model_dump(),
        "intended_use": options.intended_use,
        "clinical_use": False,
        **options.extra,
    }


def _read_images(
    items: list[tuple[LabelledFile, int]], options: TrainOptions
) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs and label indices for labelled files (every frame gets its file's label)."""
    def load(item: tuple[LabelledFile, int]) -> np.ndarray:
        return preprocess_file(item[0].path, options.input_shape, options.window)

    with ThreadPoolExecutor(max_workers=options.workers) as pool:
        arrays = list(_bar(options, iterable=pool.map(load, items), total=len(items),
                           desc="reading images"))
    x = np.concatenate(arrays) if arrays else np.zeros((0, *options.input_shape), np.float32)
    y = np.concatenate([np.full(len(a), index) for a, (_, index) in zip(arrays, items,
                                                                         strict=True)])
    return x, y.astype(np.int64)


def _predict_images(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities through the traced forward pass, batch by batch."""
    forward = compile_forward(model)
    chunks = [forward(tf.constant(x[i:i + batch_size]))[0].numpy()
              for i in range(0, len(x), batch_size)]
    return np.concatenate(chunks)


def train_cnn(data: Path, labels: Labels, out: Path, options: TrainOptions) -> Manifest:
    """Train the image CNN on every labelled image, validate on held-out patients."""
    files = scan_files(data)
    labelled = [(f, image_label(f, labels)) for f in files]
    labelled = [(f, label) for f, label in labelled if label is not None]
    if not labelled:
        raise TrainingError(f"{data}: no DICOM file there matches a row of the labels")
    classes = _classes(Counter(label for _, label in labelled), options)
    index = {label.name: i for i, label in enumerate(classes)}
    patients: dict[str, set[str]] = {}
    for f, label in labelled:
        patients.setdefault(f.patient_id, set()).add(label)
    train_ids, validation_ids = split_patients(patients, options.validation_fraction, options.seed)
    keras.utils.set_random_seed(options.seed)
    train = [(f, index[label]) for f, label in labelled if f.patient_id in train_ids]
    held = [(f, index[label]) for f, label in labelled if f.patient_id in validation_ids]
    x_train, y_train = _read_images(train, options)
    x_val, y_val = _read_images(held, options)
    model = build_cnn(len(classes), options.input_shape)
    _fit(model, x_train, y_train, options, options.epochs or DEFAULT_EPOCHS["cnn"], "cnn")
    auc, accuracy = _metrics(y_val, _predict_images(model, x_val, options.batch_size),
                             [c.name for c in classes])
    fields = _common_fields(out, "cnn", classes, [f for f, _ in labelled], options)
    fields.update(
        input_shape=list(options.input_shape),
        preprocessing=Preprocessing(window=options.window).model_dump(),
        validation=Validation(auc=auc, accuracy=accuracy, train_items=len(x_train),
                              validation_items=len(x_val),
                              validation_patients=len(validation_ids)).model_dump(),
    )
    return _save(model, out, fields)


def _pad(sequences: list[np.ndarray], width: int) -> np.ndarray:
    """Sequences of embeddings zero-padded at the end to the longest (the LSTM masks zeros)."""
    longest = max(len(s) for s in sequences)
    batch = np.full((len(sequences), longest, width), PADDING_VALUE, dtype=np.float32)
    for row, sequence in enumerate(sequences):
        batch[row, : len(sequence)] = sequence
    return batch


def train_lstm(data: Path, labels: Labels, out: Path, cnn: Path, options: TrainOptions) -> Manifest:
    """Train a series LSTM over the embeddings of an existing CNN, in slice order."""
    loaded = load_model(cnn)
    if loaded.manifest.kind != "cnn":
        raise TrainingError(f"{cnn}: is a {loaded.manifest.kind}, --cnn needs a cnn")
    grouped = group_series(scan_files(data))
    labelled = [(items, series_label(items, labels)) for items in grouped.values()]
    labelled = [(items, label) for items, label in labelled if label is not None]
    if not labelled:
        raise TrainingError(f"{data}: no series there has a label")
    classes = _classes(Counter(label for _, label in labelled), options)
    index = {label.name: i for i, label in enumerate(classes)}
    patients: dict[str, set[str]] = {}
    for items, label in labelled:
        patients.setdefault(items[0].patient_id, set()).add(label)
    train_ids, validation_ids = split_patients(patients, options.validation_fraction, options.seed)
    keras.utils.set_random_seed(options.seed)
    sequences = [
        infer_series([i.path for i in items], Choice(loaded)).embeddings
        for items, _ in _bar(options, iterable=labelled, desc="embedding series")
    ]
    width = loaded.manifest.embedding_width
    in_train = np.array([items[0].patient_id in train_ids for items, _ in labelled])
    y = np.array([index[label] for _, label in labelled], dtype=np.int64)
    x = _pad(sequences, width)
    model = build_lstm(len(classes), width, loaded.manifest.lstm_units)
    _fit(model, x[in_train], y[in_train], options, options.epochs or DEFAULT_EPOCHS["lstm"],
         "lstm")
    probabilities = compile_sequence_forward(model)(tf.constant(x[~in_train])).numpy()
    auc, accuracy = _metrics(y[~in_train], probabilities, [c.name for c in classes])
    fields = _common_fields(out, "lstm", classes, [f for items, _ in labelled for f in items],
                            options)
    if options.selection is None:
        fields["selection"] = loaded.manifest.selection.model_dump()
    fields.update(
        embedding_model=loaded.manifest.name,
        embedding_width=width,
        validation=Validation(auc=auc, accuracy=accuracy, train_items=int(in_train.sum()),
                              validation_items=int((~in_train).sum()),
                              validation_patients=len(validation_ids)).model_dump(),
    )
    return _save(model, out, fields)


def train(data: Path, labels_csv: Path, kind: str, out: Path, *, cnn: Path | None = None,
          options: TrainOptions | None = None) -> Manifest:
    """Train a `cnn` or an `lstm` (which needs `cnn`, the folder of the CNN it reads)."""
    options = options or TrainOptions()
    labels = read_labels(labels_csv)
    if kind == "cnn":
        return train_cnn(data, labels, out, options)
    if kind == "lstm":
        if cnn is None:
            raise TrainingError("--kind lstm needs --cnn DIR, the CNN whose embedding it reads")
        return train_lstm(data, labels, out, cnn, options)
    raise TrainingError(f"--kind must be cnn or lstm, not {kind!r}")
