"""Labelled DICOM for training: labels.csv, the files it names, and a split by patient."""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.preprocess import PreprocessError, read_header

SOP_KEY = "SOPInstanceUID"
SERIES_KEY = "SeriesInstanceUID"
LABEL_KEY = "label"


class TrainingError(Exception):
    """Training data that cannot produce a model (bad labels file, one class, no patients)."""


@dataclass(frozen=True)
class Labels:
    """Labels by SOP Instance UID (images) and by Series Instance UID (series)."""

    instances: dict[str, str]
    series: dict[str, str]


@dataclass(frozen=True)
class LabelledFile:
    """A DICOM file with the identifiers training needs."""

    path: Path
    patient_id: str
    series_uid: str
    sop_uid: str
    modality: str
    sop_class_uid: str


def read_labels(path: Path) -> Labels:
    """Read labels.csv: a `label` column and a SOPInstanceUID and/or SeriesInstanceUID column;
    a row with a SOP Instance UID labels that image, a row with only a series UID the series."""
    try:
        with path.open(newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            fields = set(reader.fieldnames or ())
            if LABEL_KEY not in fields or not fields & {SOP_KEY, SERIES_KEY}:
                raise TrainingError(
                    f"{path}: needs a '{LABEL_KEY}' column and a '{SOP_KEY}' or "
                    f"'{SERIES_KEY}' column"
                )
            instances: dict[str, str] = {}
            series: dict[str, str] = {}
            for line, row in enumerate(reader, start=2):
                label = (row.get(LABEL_KEY) or "").strip()
                sop, uid = (row.get(SOP_KEY) or "").strip(), (row.get(SERIES_KEY) or "").strip()
                if not label or not (sop or uid):
                    raise TrainingError(f"{path}:{line}: a row needs a label and a UID")
                (instances if sop else series)[sop or uid] = label
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise TrainingError(f"{path}: cannot read labels: {error}") from error
    return Labels(instances, series)


def scan_files(data: Path) -> list[LabelledFile]:
    """Every readable DICOM file under a directory (recursively), with its identifiers."""
    found: list[LabelledFile] = []
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        try:
            ds = read_header(path)
        except PreprocessError:
            continue  # not DICOM: README files, DICOMDIRs' neighbours, checksums
        if "SOPInstanceUID" not in ds:
            continue
        found.append(
            LabelledFile(
                path=path,
                patient_id=str(ds.get("PatientID", "")),
                series_uid=str(ds.get("SeriesInstanceUID", "")),
                sop_uid=str(ds.SOPInstanceUID),
                modality=str(ds.get("Modality", "")),
                sop_class_uid=str(ds.get("SOPClassUID", "")),
            )
        )
    return found


def image_label(item: LabelledFile, labels: Labels) -> str | None:
    """An image's label: its own, else its series' label."""
    return labels.instances.get(item.sop_uid) or labels.series.get(item.series_uid)


def series_label(items: list[LabelledFile], labels: Labels) -> str | None:
    """A series' label: its own, else the one label all its labelled images agree on."""
    own = labels.series.get(items[0].series_uid)
    if own:
        return own
    found = {labels.instances[i.sop_uid] for i in items if i.sop_uid in labels.instances}
    return found.pop() if len(found) == 1 else None


def group_series(items: list[LabelledFile]) -> dict[str, list[LabelledFile]]:
    """Files grouped by Series Instance UID, series in a stable order."""
    grouped: dict[str, list[LabelledFile]] = defaultdict(list)
    for item in items:
        grouped[item.series_uid].append(item)
    return dict(sorted(grouped.items()))


def split_patients(
    patient_labels: dict[str, set[str]], validation_fraction: float, seed: int
) -> tuple[set[str], set[str]]:
    """Train and validation patient sets, stratified by each patient's set of labels."""
    strata: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for patient, found in sorted(patient_labels.items()):
        strata[tuple(sorted(found))].append(patient)
    rng = np.random.default_rng(seed)
    validation: set[str] = set()
    for patients in strata.values():
        shuffled = list(rng.permutation(patients))
        count = round(len(shuffled) * validation_fraction)
        if len(shuffled) >= 2:
            count = min(max(count, 1), len(shuffled) - 1)
        validation.update(str(p) for p in shuffled[:count])
    train = set(patient_labels) - validation
    if not train or not validation:
        raise TrainingError(
            f"{len(patient_labels)} patient(s): need at least two to split train/validation"
        )
    return train, validation


def class_order(found: Counter[str]) -> list[str]:
    """Class names in a stable order (sorted), refusing a single class."""
    if len(found) < 2:
        raise TrainingError(f"need at least two classes in the labels, found {sorted(found)}")
    return sorted(found)
