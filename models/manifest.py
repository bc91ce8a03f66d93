"""A model folder's manifest: what the model is, when it applies, and which weights it trusts."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Annotated, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MANIFEST_NAMES = ("manifest.toml", "manifest.json")
PRIVATE_SCHEME = "99PACSAI"

_Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
_Positive = Annotated[int, Field(gt=0)]


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
    kind: Literal["cnn", "lstm"]
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

    @model_validator(mode="after")
    def _kind_fields(self) -> Manifest:
        if self.kind == "cnn" and self.input_shape is None:
            raise ValueError("a cnn needs input_shape = [rows, columns, 3]")
        if self.kind == "cnn" and self.embedding_model is not None:
            raise ValueError("embedding_model is for an lstm only")
        if self.kind == "lstm" and self.embedding_model is None:
            raise ValueError("an lstm needs embedding_model = the name of its cnn")
        if self.kind == "lstm" and self.input_shape is not None:
            raise ValueError("an lstm reads embeddings: input_shape is for a cnn only")
        names = [label.name for label in self.classes]
        if len(set(names)) != len(names):
            raise ValueError("class names repeat")
        return self

    @property
    def class_names(self) -> list[str]:
        """Class names in output order."""
        return [label.name for label in self.classes]


def _field_of(error: ValidationError) -> tuple[str, str]:
    """The dotted field and message of a pydantic error, for `ManifestError`."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "(manifest)"
    more = error.error_count() - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return field, first["msg"] + suffix


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


def write_manifest(manifest: Manifest, folder: Path) -> Path:
    """Write `manifest.toml` into a model folder (the format people edit by hand)."""
    path = folder / "manifest.toml"
    data = manifest.model_dump(mode="json", exclude_none=True)
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
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
