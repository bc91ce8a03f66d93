"""`pacs-ai models import`: a model file made into a folder: the file copied, its sha256 filled
in, and a manifest to edit whose [input] and [output] are read from the file."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.manifest import PRIVATE_SCHEME, Manifest, ManifestError, sha256_of, write_manifest
from models.runtimes.base import Tensor
from models.volume import MIN_SLICES

FORMATS = {".keras": "keras", ".onnx": "onnx"}
LEGACY = (".h5", ".hdf5")
PLACEHOLDER_SIZE = {"image": 224, "series": 64}  # for dimensions the file leaves dynamic
EDIT_ME = "EDIT ME: what this model is for, on which patients and images, and who validated it"
_LAYOUTS = {4: ("NHWC", "NCHW"), 5: ("NDHWC", "NCDHW")}
_SQUASHED = ("softmax", "sigmoid")
# Operators that pass values on unchanged, between a final Softmax and the graph's output.
_PASSING = ("Identity", "Reshape", "Flatten", "Squeeze", "Cast")


@dataclass(frozen=True)
class Interface:
    """What a model file says about itself: its inputs, outputs, opset, and whether its class
    output already went through a softmax or sigmoid."""

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    squashed: bool
    opset: int | None = None


def _keras_interface(path: Path) -> Interface:
    """A .keras file's interface, loaded in safe mode (refused as a worker would refuse it)."""
    from models.runtimes.keras_file import input_name, read_model

    model = read_model(path)
    inputs = tuple(Tensor(input_name(model, i), tuple(t.shape), str(t.dtype))
                   for i, t in enumerate(model.inputs))
    outputs = tuple(Tensor(name, tuple(t.shape), str(t.dtype))
                    for name, t in zip(model.output_names, model.outputs, strict=True))
    last = model.layers[-1]
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    squashed = activation in _SQUASHED or type(last).__name__ == "Softmax"
    return Interface(inputs, outputs, squashed)


def _onnx_interface(path: Path) -> Interface:
    """An .onnx file's interface, from onnxruntime and the graph."""
    from models.runtimes.onnx_file import open_session, opset_of, read_proto, tensor_of

    proto = read_proto(path)
    session = open_session(path)
    outputs = tuple(tensor_of(arg) for arg in session.get_outputs())
    makers = {out: node for node in proto.graph.node for out in node.output}
    node, name = None, outputs[0].name
    while (node := makers.get(name)) is not None and node.op_type in _PASSING:
        name = node.input[0]
    squashed = node is not None and node.op_type in ("Softmax", "Sigmoid")
    return Interface(tuple(tensor_of(arg) for arg in session.get_inputs()), outputs, squashed,
                     opset_of(proto))


def _input_section(tensor: Tensor, path: Path) -> tuple[dict[str, Any], list[str]]:
    """[input] guessed from the first input tensor, and what the guess could not know."""
    rank = len(tensor.shape)
    if rank not in _LAYOUTS:
        raise ManifestError(path, "input", f"the model's input {tensor} is neither an image "
                            "batch (rank 4) nor a volume batch (rank 5)")
    if tensor.dtype not in ("float32", "float16", "float64"):
        raise ManifestError(path, "input.dtype", f"the model's input {tensor}: pacs-ai feeds "
                            "float32, float16 or float64")
    level = "image" if rank == 4 else "series"
    last, channels_first = _LAYOUTS[rank]
    dims = tensor.shape[1:]
    first_is_channel = dims[0] in (1, 3) and dims[-1] not in (1, 3)
    layout = channels_first if first_is_channel else last
    channels = dims[0] if first_is_channel else dims[-1]
    spatial = dims[1:] if first_is_channel else dims[:-1]
    notes = []
    if channels is None:
        channels = 1 if level == "series" else 3
        notes.append(f"input.channels: dynamic in the file, {channels} written")
    if any(d is None for d in spatial):
        notes.append(f"input.shape: dynamic in the file, {PLACEHOLDER_SIZE[level]} written "
                     "for those dimensions")
    shape = [d or PLACEHOLDER_SIZE[level] for d in spatial]
    section = {"level": level, "layout": layout, "shape": shape, "channels": channels,
               "dtype": tensor.dtype, "name": tensor.name, "normalisation": "window"}
    return section, notes


def manifest_for(file_name: str, interface: Interface, name: str, version: str, fmt: str,
                 path: Path) -> tuple[Manifest, list[str]]:
    """A valid manifest to edit: interface read from the file, placeholders for the rest."""
    inputs, notes = _input_section(interface.inputs[0], path)
    if len(interface.inputs) > 1:
        notes.append(f"input.name: the file has {len(interface.inputs)} inputs; pacs-ai "
                     "feeds one")
    output = interface.outputs[0]
    width = output.shape[-1] if len(output.shape) == 2 and output.shape[-1] else None
    if width is None:
        notes.append(f"classes: the output {output} does not say how many; 2 written")
    classes = [{"name": f"class-{i}",
                "code": {"scheme": PRIVATE_SCHEME, "value": f"{name}-{i}"[:64].upper(),
                         "meaning": f"{name} class {i}"[:64]}}
               for i in range(width or 2)]
    fields: dict[str, Any] = {
        "name": name, "version": version, "format": fmt,
        "weights_file": file_name, "weights_sha256": sha256_of(path),
        "intended_use": EDIT_ME, "clinical_use": False, "classes": classes,
        "input": inputs,
        # A volume needs a few slices: a scout or a dose report is no series for this model.
        "selection": {"min_slices": MIN_SLICES if inputs["level"] == "series" else 1},
        "output": {"activation": "none" if interface.squashed else "softmax",
                   "name": output.name},
    }
    if interface.opset is not None:
        fields["opset"] = interface.opset
    return Manifest.model_validate(fields), notes


def _header(source: Path, notes: list[str]) -> str:
    """Comments at the top of the written manifest: where it came from, what to edit."""
    lines = [f"# Written by `pacs-ai models import` from {source.name}.",
             "# Edit: classes (names, codes, thresholds), [selection], [input] normalisation",
             "# (and standardise, for a model trained with torchvision's Normalize),",
             "# intended_use; then run `pacs-ai models check` on this folder."]
    lines += [f"# Check: {note}" for note in notes]
    return "\n".join(lines) + "\n\n"


def import_model(source: Path, out: Path, name: str, version: str, fmt: str | None = None
                 ) -> tuple[Manifest, list[str]]:
    """Make `out` a model folder for `source`; ManifestError (naming the file) when the file
    cannot be one, or `out` is already in use."""
    suffix = source.suffix.lower()
    if suffix in LEGACY:
        raise ManifestError(source, "format", "a legacy HDF5 (.h5) whole model: re-save it with "
                            "model.save('model.keras') first")
    named = FORMATS.get(suffix)
    if fmt is None and named is None:
        raise ManifestError(source, "format", f"{suffix or 'no suffix'} says no format: give "
                            f"--format {' or '.join(FORMATS.values())}")
    if fmt is not None and named not in (None, fmt):
        raise ManifestError(source, "format", f"--format {fmt} for a {suffix} file")
    fmt = fmt or named
    if not source.is_file():
        raise ManifestError(source, "(file)", "no such file")
    if out.exists() and any(out.iterdir()):
        raise ManifestError(out, "(directory)", "exists and is not empty")
    with tempfile.TemporaryDirectory(prefix="pacs-ai-import-") as scratch:
        staged = Path(scratch) / (source.stem + f".{fmt}")  # nothing lands in `out` if refused
        try:
            merged = _stage(source, staged, fmt)
            interface = _keras_interface(staged) if fmt == "keras" else _onnx_interface(staged)
            manifest, notes = manifest_for(staged.name, interface, name, version, fmt, staged)
        except ManifestError as error:  # named after the file the site gave, not the copy
            raise ManifestError(source, error.field, error.message) from error
        out.mkdir(parents=True, exist_ok=True)
        shutil.move(staged, out / staged.name)
    if merged:
        notes.insert(0, f"weights_file: the weights {source.name} kept in files beside it "
                     "are inside the copy here, so its sha256 covers them")
    write_manifest(manifest, out, header=_header(source, notes))
    return manifest, notes


def _stage(source: Path, staged: Path, fmt: str) -> bool:
    """The model file copied for its folder, as one file (True: weights taken inside)."""
    if fmt == "onnx":
        from models.runtimes.onnx_file import write_whole

        return write_whole(source, staged)
    shutil.copyfile(source, staged)
    return False
