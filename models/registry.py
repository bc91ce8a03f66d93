"""The site's models: every manifest under one directory, loaded once, picked per series."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras

from models.cnn import Forward, build_cnn, compile_forward
from models.lstm import SequenceForward, build_lstm, compile_sequence_forward
from models.manifest import (
    MANIFEST_NAMES,
    Manifest,
    ManifestError,
    load_manifest,
    verified_weights,
)
from models.preprocess import read_header, to_model_input


@dataclass(frozen=True)
class SeriesInfo:
    """What model selection needs to know about a series."""

    modality: str
    body_part: str
    sop_class_uid: str
    slices: int

    @classmethod
    def from_files(cls, paths: Sequence[Path]) -> SeriesInfo:
        """Describe a series from its files' headers; slices counts frames of multi-frames."""
        if not paths:
            raise ValueError("a series needs at least one file")
        headers = [read_header(Path(path)) for path in paths]
        first = headers[0]
        return cls(
            modality=str(first.get("Modality", "")),
            body_part=str(first.get("BodyPartExamined", "")),
            sop_class_uid=str(first.get("SOPClassUID", "")),
            slices=sum(int(ds.get("NumberOfFrames") or 1) for ds in headers),
        )


@dataclass(frozen=True)
class LoadedModel:
    """A validated manifest with its verified weights loaded into Keras, and a traced forward."""

    manifest: Manifest
    folder: Path
    model: keras.Model = field(repr=False)
    forward: Forward | SequenceForward = field(repr=False)
    weights_path: Path

    @property
    def name(self) -> str:
        """The model's name from its manifest."""
        return self.manifest.name


@dataclass(frozen=True)
class Choice:
    """A CNN that applies to a series and the LSTMs stacked on its embedding that also apply."""

    cnn: LoadedModel
    lstms: tuple[LoadedModel, ...] = ()


def _upper(values: list[str]) -> set[str]:
    """Case-insensitive comparison set for DICOM code strings."""
    return {value.upper() for value in values}


def _matches(manifest: Manifest, series: SeriesInfo) -> bool:
    """Whether a manifest's selection rules admit a series (empty lists admit anything)."""
    rules = manifest.selection
    if rules.modalities and series.modality.upper() not in _upper(rules.modalities):
        return False
    if rules.body_parts and series.body_part.upper() not in _upper(rules.body_parts):
        return False
    if rules.sop_class_uids and series.sop_class_uid not in rules.sop_class_uids:
        return False
    if series.slices < rules.min_slices:
        return False
    return rules.max_slices is None or series.slices <= rules.max_slices


def build_model(manifest: Manifest, *, compile: bool = False) -> keras.Model:
    """An untrained Keras model with the manifest's architecture (compiled only for training)."""
    classes = len(manifest.classes)
    if manifest.kind == "cnn":
        assert manifest.input_shape is not None  # guaranteed by the manifest validator
        return build_cnn(
            classes, manifest.input_shape, manifest.conv_filters, manifest.embedding_width,
            compile=compile,
        )
    return build_lstm(classes, manifest.embedding_width, manifest.lstm_units, compile=compile)


def load_model(folder: Path, manifest: Manifest | None = None) -> LoadedModel:
    """Load one model folder, refusing weights whose SHA-256 differs from the manifest's."""
    manifest = manifest or load_manifest(folder)
    weights = verified_weights(manifest, folder)
    model = build_model(manifest)
    try:
        model.load_weights(weights)
    except (ValueError, OSError) as error:
        raise ManifestError(
            weights, "weights_file", f"weights do not fit the model: {error}"
        ) from error
    if manifest.kind == "cnn":
        shape = manifest.input_shape
        forward = compile_forward(model, prepare=lambda images: to_model_input(images, shape))
    else:
        forward = compile_sequence_forward(model)
    return LoadedModel(manifest, folder, model, forward, weights)


def _model_folders(models_dir: Path) -> list[Path]:
    """Model folders: the directory itself if it holds a manifest, else its subfolders that do."""
    if any((models_dir / name).is_file() for name in MANIFEST_NAMES):
        return [models_dir]
    return sorted(
        child for child in models_dir.iterdir()
        if child.is_dir() and any((child / name).is_file() for name in MANIFEST_NAMES)
    )


def scan_manifests(models_dir: Path) -> list[tuple[Path, Manifest]]:
    """Every manifest one level under a directory, checked for unique names and LSTM links."""
    if not models_dir.is_dir():
        raise ManifestError(models_dir, "(directory)", "models directory does not exist")
    found = [(folder, load_manifest(folder)) for folder in _model_folders(models_dir)]
    by_name: dict[str, tuple[Path, Manifest]] = {}
    for folder, manifest in found:
        if manifest.name in by_name:
            raise ManifestError(
                folder, "name", f"{manifest.name!r} is also used by {by_name[manifest.name][0]}"
            )
        by_name[manifest.name] = (folder, manifest)
    for folder, manifest in found:
        if manifest.kind == "lstm":
            _check_link(folder, manifest, by_name)
    return found


def _check_link(folder: Path, lstm: Manifest, by_name: dict[str, tuple[Path, Manifest]]) -> None:
    """An LSTM must name an existing CNN whose embedding width it reads."""
    target = by_name.get(str(lstm.embedding_model))
    if target is None or target[1].kind != "cnn":
        raise ManifestError(
            folder, "embedding_model", f"no cnn named {lstm.embedding_model!r} in the registry"
        )
    if target[1].embedding_width != lstm.embedding_width:
        raise ManifestError(
            folder,
            "embedding_width",
            f"{lstm.embedding_width} differs from {lstm.embedding_model!r}'s "
            f"{target[1].embedding_width}",
        )


@dataclass(frozen=True)
class Registry:
    """The loaded models of a site; build it once per worker process with `Registry.load`."""

    cnns: tuple[LoadedModel, ...]
    lstms: tuple[LoadedModel, ...]

    @classmethod
    def load(cls, models_dir: Path) -> Registry:
        """Validate every manifest, verify every weights file, and load all weights once."""
        loaded = [load_model(folder, manifest) for folder, manifest in scan_manifests(models_dir)]
        return cls(
            cnns=tuple(model for model in loaded if model.manifest.kind == "cnn"),
            lstms=tuple(model for model in loaded if model.manifest.kind == "lstm"),
        )

    def select(self, series: SeriesInfo) -> list[Choice]:
        """The CNNs whose rules admit the series, each with its admitted LSTMs."""
        return [
            Choice(
                cnn,
                tuple(
                    lstm for lstm in self.lstms
                    if lstm.manifest.embedding_model == cnn.name and _matches(lstm.manifest, series)
                ),
            )
            for cnn in self.cnns
            if _matches(cnn.manifest, series)
        ]
