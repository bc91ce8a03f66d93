"""`pacs-ai models check`: load a model folder exactly as a worker will, run one synthetic batch
and, optionally, a real study; print what it reads and answers, and how fast."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from pydicom.errors import InvalidDicomError

from models.dataset import group_series, scan_files
from models.infer import infer_series
from models.loaded import LoadedModel, load_model, probe
from models.manifest import MANIFEST_NAMES, Manifest, ManifestError, load_manifest
from models.preprocess import PreprocessError
from models.registry import Choice, Registry, SeriesInfo, refusal, scan_manifests
from models.volume import infer_volume

OK, FAILED, BAD_FOLDER = 0, 1, 2
# What a model can fail with on a study it was loaded for (the series would get an error row).
STUDY_ERRORS = (PreprocessError, InvalidDicomError, ValueError, OSError)

Print = Callable[[str], None]


def _is_model_folder(folder: Path) -> bool:
    return any((folder / name).is_file() for name in MANIFEST_NAMES)


def _with_linked_cnn(folder: Path) -> list[tuple[Path, Manifest]]:
    """A single folder, and for an LSTM the sibling folder of the CNN it reads."""
    manifest = load_manifest(folder)
    found = [(folder, manifest)]
    if manifest.level != "embeddings":
        return found
    for sibling in sorted(folder.parent.iterdir()):
        if sibling == folder or not _is_model_folder(sibling):
            continue
        try:
            other = load_manifest(sibling)
        except ManifestError:
            continue  # an unrelated broken sibling is not this check's business
        if other.name == manifest.embedding_model:
            return [(sibling, other), *found]
    raise ManifestError(folder, "embedding_model",
                        f"no folder beside it holds {manifest.embedding_model!r}")


def load_for_check(directory: Path, device: str = "cpu") -> Registry:
    """The models of one folder (with an LSTM's CNN) or of a whole `[models] dir`, loaded and
    checked as a worker loads them; ManifestError on the first problem."""
    if _is_model_folder(directory):
        folders = _with_linked_cnn(directory)
        loaded = [load_model(folder, manifest, device) for folder, manifest in folders]
        lstms = tuple(m for m in loaded if m.manifest.level == "embeddings")
        return Registry(tuple(m for m in loaded if m.manifest.level == "image"), lstms,
                        tuple(m for m in loaded if m.manifest.level == "series"))
    if not directory.is_dir():
        raise ManifestError(directory, "(directory)", "no such model folder")
    scan_manifests(directory)  # names unique, links resolved, before anything loads
    return Registry.load(directory, device)


def _classes(manifest: Manifest, probabilities: np.ndarray) -> str:
    """`name p` for each class."""
    return " ".join(f"{name} {float(p):.3f}" for name, p in zip(manifest.class_names,
                                                               probabilities, strict=True))


def _input_line(model: LoadedModel) -> str:
    manifest = model.manifest
    if manifest.level == "embeddings":
        return f"{model.runtime.input}: the embeddings of {manifest.embedding_model!r}"
    spec = manifest.reads
    scaling = spec.normalisation
    if scaling == "window":
        window = spec.window
        scaling += " auto" if window == "auto" else f" {window.center:g}/{window.width:g}"
    if spec.standardise is not None:
        mean, std = (", ".join(f"{v:g}" for v in values)
                     for values in (spec.standardise.mean, spec.standardise.std))
        scaling += f", standardised by mean {mean} std {std}"
    depth = f", spacing {spec.spacing_mm:g} mm" if spec.spacing_mm else ""
    return (f"{model.runtime.input}: {spec.level} level, {spec.layout}, {spec.channels} "
            f"channel{'s' if spec.channels > 1 else ''}, {scaling}{depth}")


def describe(model: LoadedModel, out: Print) -> None:
    """What the model is, reads and answers, and one synthetic batch (timed after the load's
    own run, so tracing is not counted)."""
    answers = model.manifest.answers
    embedding = f"; embedding {model.runtime.embedding}" if model.runtime.embedding else ""
    tried = probe(model)
    per = "series" if model.manifest.level != "image" else "image"
    out(f"{model.name} {model.manifest.version} ({model.folder}): loaded")
    out(f"  format    {model.manifest.format}, {model.runtime.version}")
    out(f"  input     {_input_line(model)}")
    out(f"  output    {model.runtime.output}, activation {answers.activation}{embedding}")
    out(f"  synthetic batch {tried.shape}: {_classes(model.manifest, tried.probabilities[0])};"
        f" {tried.seconds_per_item * 1000:.1f} ms per {per}")


@dataclass(frozen=True)
class _Series:
    uid: str
    paths: tuple[Path, ...]


def _study(path: Path) -> list[_Series]:
    """The DICOM series under a path (a file or a folder), by Series Instance UID."""
    files = scan_files(path) if path.is_dir() else scan_files(path.parent)
    if not path.is_dir():
        files = [f for f in files if f.path == path]
    return [_Series(uid, tuple(f.path for f in items))
            for uid, items in group_series(files).items()]


def _run_image(choice: Choice, series: _Series, out: Print) -> None:
    result = infer_series(series.paths, choice)
    count = len(result.rows)
    images = max(count, 1)
    top = result.image_probabilities.max(axis=0) if count else np.zeros(0)
    out(f"  series {series.uid} ({count} image{'' if count == 1 else 's'}), highest per class: "
        f"{_classes(choice.cnn.manifest, top)}; {result.timing.total_s / images * 1000:.1f} ms"
        f" per image ({result.timing.forward_s / images * 1000:.1f} forward)")
    for lstm in result.series:
        out(f"    {lstm.manifest.name}: {_classes(lstm.manifest, lstm.probabilities)}")


def _run_volume(model: LoadedModel, series: _Series, out: Print) -> None:
    result = infer_volume(series.paths, model)
    timing = result.timing
    out(f"  series {series.uid} ({len(result.rows)} slices as one volume): "
        f"{_classes(model.manifest, result.probabilities)}; {timing.total_s * 1000:.0f} ms per "
        f"series ({timing.resample_s * 1000:.0f} resampling, {timing.forward_s * 1000:.0f} "
        "forward)")


def run_study(registry: Registry, study: Path, out: Print) -> bool:
    """Each model on each series of the study its selection admits (and, for each series, the
    rule that keeps any other model off it); False when a model fails on a series, or no
    model admits any."""
    series_list = _study(study)
    if not series_list:
        out(f"{study}: no DICOM series there")
        return False
    ran, ok = 0, True
    for series in series_list:
        info = SeriesInfo.from_files(series.paths)
        skipped = [f"{m.name}: {why}" for m in registry.models
                   if (why := refusal(m.manifest, info)) is not None]
        if skipped:
            out(f"series {series.uid} ({info.modality or 'no modality'}, {info.slices} "
                f"image{'' if info.slices == 1 else 's'}) is not for {'; '.join(skipped)}")
        runs = [(c.cnn.name, partial(_run_image, c)) for c in registry.select(info)]
        runs += [(m.name, partial(_run_volume, m)) for m in registry.select_volumes(info)]
        for name, run in runs:
            out(f"{name} on {study}:")
            ran += 1
            try:
                run(series, out)
            except STUDY_ERRORS as error:
                out(f"  FAILED on series {series.uid}: {error}")
                ok = False
    if not ran:
        out(f"{study}: no model's [selection] admits any of its {len(series_list)} series")
    return ok and ran > 0


def check(directory: Path, study: Path | None = None, device: str = "cpu",
          out: Print = print) -> int:
    """Load, describe and try the models of a folder; 0 ok, 1 a model fails on the study,
    2 the folder is wrong (one line on stderr naming the file and field)."""
    try:
        registry = load_for_check(directory, device)
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return BAD_FOLDER
    if not registry.models:
        print(f"error: {directory}: no model folder there", file=sys.stderr)
        return BAD_FOLDER
    for model in registry.models:
        describe(model, out)
    if study is None:
        return OK
    return OK if run_study(registry, study, out) else FAILED
