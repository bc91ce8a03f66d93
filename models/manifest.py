"""A model folder's manifest: what the model is, when it applies, and which weights it trusts."""

from __future__ import annotations

import difflib
import hashlib
import json
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Literal, get_args

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MANIFEST_NAMES = ("manifest.toml", "manifest.json")
PRIVATE_SCHEME = "99PACSAI"

_Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
_Positive = Annotated[int, Field(gt=0)]


class FieldProblem(ValueError):
    """A validator's refusal that names the field at fault (pydantic's model-level errors
    otherwise name none)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ManifestError(Exception):
    """A manifest that cannot be trusted, naming the file and the field so a site can fix it."""

    def __init__(self, path: Path | str, field: str, message: str) -> None:
        super().__init__(path, field, message)
        self.path = Path(path)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}: {self.field}: {self.message}"


class _Strict(BaseModel):
    """Base for manifest sections: unknown keys are typos, so they are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Code(_Strict):
    """A coded concept as it will appear in the SR (coding scheme designator, value, meaning)."""

    scheme: Annotated[str, Field(min_length=1, max_length=16)]
    value: Annotated[str, Field(min_length=1, max_length=64)]
    meaning: Annotated[str, Field(min_length=1, max_length=64)]


class ClassLabel(_Strict):
    """One output of the model: its name, its code in the SR, and the probability that counts."""

    name: _Name
    code: Code
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5


class Selection(_Strict):
    """Which series the model applies to; an empty list means any value."""

    modalities: list[str] = []
    body_parts: list[str] = []
    sop_class_uids: list[str] = []
    min_slices: _Positive = 1
    max_slices: _Positive | None = None

    @model_validator(mode="after")
    def _ordered_bounds(self) -> Selection:
        if self.max_slices is not None and self.max_slices < self.min_slices:
            raise ValueError("max_slices is smaller than min_slices")
        return self


class Window(_Strict):
    """A fixed VOI window (centre/width, as in the DICOM VOI LUT module)."""

    center: float
    width: Annotated[float, Field(gt=0.0)]


class Preprocessing(_Strict):
    """How pixels become model input; `auto` takes the dataset's window, else its min/max."""

    window: Window | Literal["auto"] = "auto"

    @property
    def intensity(self) -> Intensity:
        """The seed models' intensity scaling: the window, onto 0..1."""
        return Intensity(normalisation="window", window=self.window)


Normalisation = Literal["window", "zscore", "range", "none"]
Layout = Literal["NHWC", "NCHW", "NDHWC", "NCDHW"]
LAYOUT_LEVEL = {"NHWC": "image", "NCHW": "image", "NDHWC": "series", "NCDHW": "series"}


class Intensity(_Strict):
    """Modality values (after the Modality LUT) to model values: `window` maps a VOI window
    onto 0..1, `range` clips to [min, max] and maps that onto 0..1, `zscore` subtracts the
    mean and divides by the standard deviation (both measured on the input itself when not
    given), `none` passes the modality values as they are."""

    normalisation: Normalisation = "window"
    window: Window | Literal["auto"] = "auto"
    mean: float | None = None
    std: Annotated[float, Field(gt=0.0)] | None = None
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _fields_of_the_method(self) -> Intensity:
        method = self.normalisation
        if method != "window" and self.window != "auto":
            raise FieldProblem("window", f"is for normalisation = \"window\", not {method!r}")
        if (self.mean is None) != (self.std is None):
            raise FieldProblem("mean", "zscore takes mean and std together (or neither: "
                               "measured on the input)")
        if method != "zscore" and self.mean is not None:
            raise FieldProblem("mean", f"is for normalisation = \"zscore\", not {method!r}")
        if method == "range":
            if self.min is None or self.max is None or not self.min < self.max:
                raise FieldProblem("min", "range needs min < max (the values mapped onto 0 "
                                   "and 1)")
        elif self.min is not None or self.max is not None:
            raise FieldProblem("min", f"is for normalisation = \"range\", not {method!r}")
        return self


class Standardise(_Strict):
    """`[input] standardise`: after a window or range (0..1) and the channels, each channel
    less its mean over its std, as a model trained with torchvision's `Normalize` (ImageNet's
    mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225]) expects; one value for all
    channels, or one per channel."""

    mean: Annotated[list[float], Field(min_length=1, max_length=3)]
    std: Annotated[list[Annotated[float, Field(gt=0.0)]], Field(min_length=1, max_length=3)]

    @model_validator(mode="after")
    def _paired(self) -> Standardise:
        if len(self.mean) != len(self.std):
            raise FieldProblem("std", f"{len(self.std)} values for {len(self.mean)} means")
        return self


class ModelInput(Intensity):
    """What a keras or onnx model reads (`[input]`): one image, or the whole series as one
    volume, in which layout, size, channels and dtype, scaled how; checked against the file."""

    level: Literal["image", "series"]
    layout: Layout
    shape: Annotated[list[_Positive], Field(min_length=2, max_length=3)]
    channels: Literal[1, 3]
    dtype: Literal["float32", "float16", "float64"] = "float32"
    name: str | None = None
    spacing_mm: Annotated[float, Field(gt=0.0)] | None = None
    standardise: Standardise | None = None

    @model_validator(mode="after")
    def _level_layout_shape(self) -> ModelInput:
        if LAYOUT_LEVEL[self.layout] != self.level:
            raise FieldProblem("layout", f"{self.layout} is not for level {self.level!r}")
        wanted = 2 if self.level == "image" else 3
        if len(self.shape) != wanted:
            what = "[rows, columns]" if wanted == 2 else "[depth, rows, columns]"
            raise FieldProblem("shape", f"a level {self.level!r} input is {what}")
        if self.spacing_mm is not None and self.level != "series":
            raise FieldProblem("spacing_mm", "is for level \"series\" (a volume's slice "
                               "spacing)")
        if self.standardise is not None:
            if self.normalisation not in ("window", "range"):
                raise FieldProblem("standardise", "follows a window or range (values in 0..1), "
                                   f"not normalisation = {self.normalisation!r}")
            if len(self.standardise.mean) not in (1, self.channels):
                raise FieldProblem("standardise", f"{len(self.standardise.mean)} means for "
                                   f"{self.channels} channel(s): give one, or one per channel")
        return self

    @property
    def intensity(self) -> Intensity:
        """The intensity part alone (what decoding needs)."""
        return Intensity(**{field: getattr(self, field) for field in Intensity.model_fields})


class ModelOutput(_Strict):
    """What the model answers (`[output]`): the activation pacs-ai applies to the output to
    get probabilities (`softmax`: one class of several; `sigmoid`: each class on its own,
    several findings at once; `none`: the model already gives probabilities), which output
    tensor, and optionally an embedding output an LSTM can read."""

    activation: Literal["softmax", "sigmoid", "none"]
    name: str | None = None
    embedding: str | None = None


class Explain(_Strict):
    """Grad-CAM settings (`[explain]`): the layer whose maps explain (default: the last
    2D convolution)."""

    layer: str | None = None


class Validation(_Strict):
    """Metrics measured on held-out patients when the weights were trained."""

    auc: dict[str, float]
    accuracy: float
    train_items: int
    validation_items: int
    validation_patients: int


class Manifest(_Strict):
    """Everything the daemon needs to know about one model, validated before any weights load."""

    name: _Name
    version: Annotated[str, Field(min_length=1, max_length=64)]
    format: Literal["seed", "keras", "onnx"] = "seed"
    kind: Literal["cnn", "lstm"] | None = None
    classes: Annotated[list[ClassLabel], Field(min_length=2)]
    selection: Selection = Selection()
    preprocessing: Preprocessing = Preprocessing()
    weights_file: Annotated[str, Field(pattern=r"^[^/\\]+$")]
    weights_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    intended_use: Annotated[str, Field(min_length=1)]
    clinical_use: bool
    heatmaps: bool = False
    shadow: bool = False
    input_shape: tuple[_Positive, _Positive, Literal[3]] | None = None
    conv_filters: Annotated[list[_Positive], Field(min_length=1)] = [32, 64, 128]
    embedding_width: _Positive = 512
    lstm_units: Annotated[list[_Positive], Field(min_length=1)] = [64, 64, 64]
    embedding_model: _Name | None = None
    validation: Validation | None = None
    input: ModelInput | None = None
    output: ModelOutput | None = None
    explain: Explain | None = None
    opset: _Positive | None = None

    @model_validator(mode="after")
    def _format_fields(self) -> Manifest:
        if self.format == "seed":
            return self._seed_fields()
        return self._file_fields()

    def _file_fields(self) -> Manifest:
        """A keras or onnx model: the file says the architecture, [input]/[output] say how
        to feed it and read it."""
        seed_only = sorted(self.model_fields_set & _SEED_ONLY)
        if seed_only:
            raise FieldProblem(seed_only[0], f"for the seed formats only; a {self.format} "
                               "model is described by [input] and [output]")
        if self.input is None or self.output is None:
            raise FieldProblem("input" if self.input is None else "output",
                               f"a {self.format} model needs an [input] and an [output] section")
        suffix = f".{self.format}"
        if not self.weights_file.endswith(suffix):
            legacy = " (legacy .h5 whole models are refused: re-save as .keras)"
            raise FieldProblem("weights_file", f"a {self.format} model is a {suffix} file"
                               f"{legacy if self.format == 'keras' else ''}")
        if self.opset is not None and self.format != "onnx":
            raise FieldProblem("opset", "is for an onnx model")
        if self.heatmaps:
            self._explainable()
        if self.explain is not None and (self.format != "keras" or not self.heatmaps):
            raise FieldProblem("explain", "is for a keras model with heatmaps = true")
        return self._unique_classes()

    def _explainable(self) -> None:
        """Grad-CAM needs a Keras graph of 2D, channels-last maps."""
        assert self.input is not None
        if self.format == "onnx":
            reason = "no Grad-CAM for an ONNX model (its gradients are not reachable here)"
        elif self.input.level == "series":
            reason = "no Grad-CAM for a 3D (level \"series\") model"
        elif self.input.layout != "NHWC":
            reason = "Grad-CAM reads channels-last (NHWC) maps"
        else:
            return
        raise FieldProblem("heatmaps", f"{reason}; set heatmaps = false")

    def _seed_fields(self) -> Manifest:
        """The seed CNN and LSTM, as they always were."""
        if self.kind is None:
            raise FieldProblem("kind", "a seed model is a cnn or an lstm (or set format = "
                               "\"keras\" or \"onnx\")")
        for section in ("input", "output", "explain", "opset"):
            if getattr(self, section) is not None:
                raise FieldProblem(section, f"is for keras and onnx models; a seed "
                                   f"{self.kind} uses input_shape and preprocessing")
        if self.kind == "cnn" and self.input_shape is None:
            raise FieldProblem("input_shape", "a cnn needs input_shape = [rows, columns, 3]")
        if self.kind == "cnn" and self.embedding_model is not None:
            raise FieldProblem("embedding_model", "is for an lstm only")
        if self.kind == "lstm" and self.embedding_model is None:
            raise FieldProblem("embedding_model", "an lstm needs the name of its cnn")
        if self.kind == "lstm" and self.input_shape is not None:
            raise FieldProblem("input_shape", "is for a cnn only (an lstm reads embeddings)")
        return self._unique_classes()

    def _unique_classes(self) -> Manifest:
        names = [label.name for label in self.classes]
        if len(set(names)) != len(names):
            raise FieldProblem("classes", "class names repeat")
        return self

    @property
    def class_names(self) -> list[str]:
        """Class names in output order."""
        return [label.name for label in self.classes]

    @property
    def level(self) -> Literal["image", "series", "embeddings"]:
        """What one prediction reads: an image (a CNN), the series as a volume, or a
        sequence of a CNN's embeddings (the seed LSTM)."""
        if self.format == "seed":
            return "image" if self.kind == "cnn" else "embeddings"
        assert self.input is not None  # guaranteed by the validator
        return self.input.level

    @property
    def reads(self) -> ModelInput:
        """The input of an image or series model in one form for every format (the seed
        CNN's: NHWC, three channels, its window)."""
        if self.input is not None:
            return self.input
        if self.kind != "cnn" or self.input_shape is None:
            raise ValueError(f"model {self.name!r} reads embeddings, not images")
        return ModelInput(level="image", layout="NHWC", shape=list(self.input_shape[:2]),
                          channels=3, window=self.preprocessing.window)

    @property
    def answers(self) -> ModelOutput:
        """The output in one form for every format (the seed's ends in its softmax)."""
        return self.output or ModelOutput(activation="none")


# Fields that describe the seed architectures; a keras or onnx file says its own.
_SEED_ONLY = frozenset({"kind", "input_shape", "conv_filters", "embedding_width", "lstm_units",
                        "preprocessing", "embedding_model"})


def _models_in(annotation: object) -> Iterator[type[BaseModel]]:
    """The manifest sections an annotation names, through lists, unions and Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in get_args(annotation):
        yield from _models_in(arg)


def _fields_at(loc: Sequence[str]) -> list[str]:
    """The fields the manifest knows at `loc` (e.g. ["input"]); none where it cannot tell."""
    model: type[BaseModel] | None = Manifest
    for part in loc:
        if part.isdigit() or model is None:  # an item of a list: the list's own section
            continue
        field = model.model_fields.get(part)
        model = next(_models_in(field.annotation), None) if field else None
    return list(model.model_fields) if model is not None else []


def _field_of(error: ValidationError) -> tuple[str, str]:
    """The dotted field and message of a pydantic error, for `ManifestError`; an unknown
    field comes first, since a misspelt one also makes its right spelling missing."""
    errors = error.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc, message = [str(part) for part in first["loc"]], first["msg"]
    if first["type"] == "extra_forbidden":
        meant = difflib.get_close_matches(loc[-1], _fields_at(loc[:-1]), n=1)
        message = "unknown key" + (f" (did you mean {meant[0]}?)" if meant else "")
    problem = first.get("ctx", {}).get("error")
    if isinstance(problem, FieldProblem):
        loc, message = [*loc, problem.field], problem.message
    field = ".".join(loc) or "(manifest)"
    more = error.error_count() - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return field, message + suffix


def manifest_path(folder: Path) -> Path:
    """The manifest file of a model folder (TOML preferred, JSON accepted)."""
    for name in MANIFEST_NAMES:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    raise ManifestError(folder, "(manifest)", "no manifest.toml or manifest.json")


def parse_manifest(path: Path) -> Manifest:
    """Read and validate one manifest file, naming the file and field of the first problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(path, "(file)", f"cannot read: {error}") from error
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(path, "(syntax)", str(error)) from error
    try:
        return Manifest.model_validate(data)
    except ValidationError as error:
        raise ManifestError(path, *_field_of(error)) from error


def load_manifest(folder: Path) -> Manifest:
    """Read the manifest of a model folder."""
    return parse_manifest(manifest_path(folder))


def write_manifest(manifest: Manifest, folder: Path, header: str = "") -> Path:
    """Write `manifest.toml` into a model folder (the format people edit by hand), after
    `header` (comments)."""
    path = folder / "manifest.toml"
    data = manifest.model_dump(mode="json", exclude_none=True)
    for key in ("format",) if manifest.format == "seed" else _SEED_ONLY:
        data.pop(key, None)
    path.write_text(header + tomli_w.dumps(data), encoding="utf-8")
    return path


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks so large weights cost no memory."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verified_weights(manifest: Manifest, folder: Path) -> Path:
    """The weights path, after checking it is the file the manifest names by SHA-256."""
    path = folder / manifest.weights_file
    if not path.is_file():
        raise ManifestError(path, "weights_file", "weights file is missing")
    actual = sha256_of(path)
    if actual != manifest.weights_sha256:
        raise ManifestError(
            path,
            "weights_sha256",
            f"weights do not match the manifest (expected {manifest.weights_sha256}, "
            f"file has {actual}); refusing to load",
        )
    return path
