"""The reproducible demo: synthetic CT phantoms with or without a hyperdense lesion, and a CNN
and an LSTM trained on them. For showing the pipeline end to end; never for clinical use."""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import CTImageStorage

from models.dataset import read_labels
from models.manifest import ClassLabel, Code, Manifest, Selection, Window
from models.phantom import SyntheticSeries, synthesize_series, write_series
from models.train import TrainOptions, train_cnn, train_lstm

__all__ = ["DemoConfig", "DemoResult", "make_demo", "synthesize_series", "write_series"]

DEMO_SCHEME = "99PACSAI"
DEMO_CLASSES = (
    ClassLabel(name="normal",
               code=Code(scheme=DEMO_SCHEME, value="DEMO-NORMAL",
                         meaning="Demo: no synthetic lesion")),
    ClassLabel(name="lesion",
               code=Code(scheme=DEMO_SCHEME, value="DEMO-LESION",
                         meaning="Demo: synthetic hyperdense lesion")),
)
DEMO_USE = ("Demonstration only: trained on synthetic CT phantoms to show the pacs-ai pipeline; "
            "not for clinical use.")
DEMO_WINDOW = Window(center=40.0, width=400.0)


@dataclass(frozen=True)
class DemoConfig:
    """Size of the demo; `quick()` trains in seconds for tests."""

    patients: int = 200  # each with a lesion series and its lesion-free twin
    slices: int = 6
    rows: int = 128
    input_size: int = 64
    cnn_epochs: int = 10
    lstm_epochs: int = 40
    seed: int = 20240101

    @classmethod
    def quick(cls) -> DemoConfig:
        """A demo small enough for tests (seconds, not minutes) that still tells a lesion
        slice from the others on a plain phantom."""
        return cls(patients=40, slices=4, rows=64, input_size=48, cnn_epochs=8, lstm_epochs=4)


@dataclass(frozen=True)
class DemoResult:
    """Where the demo put its data and models, and how long it took."""

    data_dir: Path
    labels_csv: Path
    models_dir: Path
    cnn: Manifest
    lstm: Manifest
    seconds: float


def _write_data(data: Path, config: DemoConfig) -> list[SyntheticSeries]:
    """Per synthetic patient, a series with a lesion and its twin without: the same
    background and noise, so the lesion is the one thing that tells them apart. Three
    patients in four get a varied background, at a quarter, half or all of `rows` (at
    least 32)."""
    sizes = (max(32, config.rows // 4), max(32, config.rows // 2), config.rows)
    return [
        synthesize_series(
            data / f"patient-{index:03d}" / ("lesion" if lesion else "normal"),
            slices=config.slices, rows=sizes[index % 3], cols=sizes[index % 3], lesion=lesion,
            seed=config.seed + index, patient_id=f"DEMO-{index:03d}", varied=index % 4 != 0,
        )
        for index in range(config.patients)
        for lesion in (True, False)
    ]


def _write_labels(path: Path, written: list[SyntheticSeries]) -> None:
    """labels.csv with a label per slice (for the CNN) and per series (for the LSTM)."""
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["SOPInstanceUID", "SeriesInstanceUID", "label"])
        for series in written:
            for index, uid in enumerate(series.sop_instance_uids):
                label = "lesion" if index in series.lesion_slices else "normal"
                writer.writerow([uid, series.series_uid, label])
            writer.writerow(["", series.series_uid, "lesion" if series.lesion_slices else "normal"])


def make_demo(out: Path, config: DemoConfig | None = None, *, progress: bool = True) -> DemoResult:
    """Generate the phantom data under `out/data` and train `out/models/demo-cnn` and
    `out/models/demo-lstm`, with fixed seeds."""
    config = config or DemoConfig()
    start = time.perf_counter()
    data, models = out / "data", out / "models"
    written = _write_data(data, config)
    labels_csv = out / "labels.csv"
    _write_labels(labels_csv, written)
    labels = read_labels(labels_csv)
    common = dict(
        version="1.0.0", classes=DEMO_CLASSES, window=DEMO_WINDOW, intended_use=DEMO_USE,
        seed=config.seed, progress=progress,
        input_shape=(config.input_size, config.input_size, 3),
    )
    rules = Selection(modalities=["CT"], sop_class_uids=[CTImageStorage])
    cnn = train_cnn(data, labels, models / "demo-cnn", TrainOptions(
        name="demo-cnn", epochs=config.cnn_epochs, selection=rules,
        extra={"heatmaps": True}, **common))
    lstm = train_lstm(data, labels, models / "demo-lstm", models / "demo-cnn", TrainOptions(
        name="demo-lstm", epochs=config.lstm_epochs, batch_size=16,
        selection=rules.model_copy(update={"min_slices": 2}), **common))
    return DemoResult(data, labels_csv, models, cnn, lstm, time.perf_counter() - start)
