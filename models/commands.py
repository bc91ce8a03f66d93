"""`pacs-ai models ...` commands: print to stdout, return 0 (ok), 1 (failed) or 2 (bad input)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from models.dataset import TrainingError
from models.demo import DemoConfig, make_demo
from models.manifest import Manifest, ManifestError, verified_weights
from models.preprocess import PreprocessError
from models.registry import scan_manifests
from models.train import TrainOptions, train

OK, FAILED, BAD_INPUT = 0, 1, 2


def _fail(message: str, code: int) -> int:
    """Report a failure on stderr and return its exit code."""
    print(f"error: {message}", file=sys.stderr)
    return code


def _weights_state(folder: Path, manifest: Manifest) -> str:
    """'ok', or why the weights would be refused at load."""
    try:
        verified_weights(manifest, folder)
    except ManifestError as error:
        return f"refused: {error.message}"
    return "ok"


def list_models(models_dir: Path, as_json: bool = False) -> int:
    """Show every model under a directory with its weights check, so a site sees what will run."""
    try:
        found = scan_manifests(models_dir)
    except ManifestError as error:
        return _fail(str(error), BAD_INPUT)
    rows = [
        {"folder": str(folder), "weights": _weights_state(folder, manifest),
         **manifest.model_dump(mode="json", exclude_none=True)}
        for folder, manifest in found
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'NAME':<20} {'VERSION':<10} {'KIND':<12} {'CLASSES':<28} {'CLINICAL':<8} "
              "WEIGHTS")
        for (_, manifest), row in zip(found, rows, strict=True):
            classes = ",".join(manifest.class_names)
            clinical = "yes" if manifest.clinical_use else "no"
            kind = manifest.kind if manifest.format == "seed" else (
                f"{manifest.format}/{manifest.level}")
            print(f"{manifest.name:<20} {manifest.version:<10} {kind:<12} {classes:<28} "
                  f"{clinical:<8} {row['weights']}")
    refused = [row for row in rows if row["weights"] != "ok"]
    return BAD_INPUT if refused else OK


def train_command(
    data: Path,
    labels: Path,
    kind: str,
    out: Path,
    cnn: Path | None = None,
    epochs: int | None = None,
    *,
    name: str | None = None,
    version: str = "0.1.0",
    input_size: int = 224,
    batch_size: int = 32,
    seed: int = 0,
) -> int:
    """Train a model folder from DICOM and labels.csv and print its validation metrics."""
    if kind not in ("cnn", "lstm"):
        return _fail(f"--kind must be cnn or lstm, not {kind!r}", BAD_INPUT)
    if not data.is_dir() or not labels.is_file():
        return _fail(f"need --data DIR ({data}) and --labels FILE ({labels})", BAD_INPUT)
    options = TrainOptions(name=name, version=version, epochs=epochs, batch_size=batch_size,
                           input_shape=(input_size, input_size, 3), seed=seed)
    try:
        manifest = train(data, labels, kind, out, cnn=cnn, options=options)
    except (TrainingError, ManifestError) as error:
        return _fail(str(error), BAD_INPUT)
    except PreprocessError as error:
        return _fail(str(error), FAILED)
    print(f"wrote {out} ({manifest.name} {manifest.version}, {manifest.kind})")
    if manifest.validation is not None:
        print(f"validation: {manifest.validation.model_dump_json()}")
    return OK


def demo_command(out: Path, *, quick: bool = False) -> int:
    """Generate the synthetic demo data and train the demo CNN and LSTM into `out/models`."""
    try:
        result = make_demo(out, DemoConfig.quick() if quick else DemoConfig())
    except (TrainingError, ManifestError) as error:
        return _fail(str(error), BAD_INPUT)
    except (PreprocessError, OSError) as error:
        return _fail(str(error), FAILED)
    for manifest in (result.cnn, result.lstm):
        validation = manifest.validation.model_dump_json() if manifest.validation else "none"
        print(f"{manifest.name}: validation {validation}")
    print(f"models in {result.models_dir} (data {result.data_dir}); {result.seconds:.1f} s")
    return OK


def check_command(directory: Path, study: Path | None = None, device: str = "cpu") -> int:
    """Load a model folder (or a whole models directory) as a worker will, try it on a
    synthetic batch and, with `study`, on real DICOM: 0 ok, 1 fails on the study, 2 the
    folder is wrong."""
    from models.check import check

    if study is not None and not study.exists():
        return _fail(f"--study {study}: no such file or folder", BAD_INPUT)
    return check(directory, study, device)


def import_command(source: Path, out: Path, name: str, version: str,
                   fmt: str | None = None) -> int:
    """Make a model folder from a .keras or .onnx file, with a manifest to edit."""
    from models.importer import import_model

    try:
        import_model(source, out, name, version, fmt)
    except ManifestError as error:
        return _fail(str(error), BAD_INPUT)
    print(f"wrote {out} ({name} {version}); edit {out / 'manifest.toml'} (classes, codes, "
          f"selection, normalisation, intended use), then: pacs-ai models check {out}")
    return OK
