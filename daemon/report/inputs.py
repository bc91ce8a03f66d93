"""Plain inputs of the report builders, so that report/ never needs models/ or the database."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

from daemon.report.uids import hashed_uid

Level = Literal["image", "series"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TRACKING_NAMESPACE = "pacs-ai/tracking/v1"


@dataclass(frozen=True)
class CodeSpec:
    """A coded concept as a model manifest states it, so a finding is machine-readable."""

    scheme: str
    value: str
    meaning: str
    scheme_name: str | None = None
    scheme_version: str | None = None

    def __post_init__(self) -> None:
        """Refuse codes that would only fail later inside the SR builder."""
        if not self.scheme or not self.value or not self.meaning:
            raise ValueError(f"code needs scheme, value and meaning: {self!r}")
        if len(self.scheme) > 16:
            raise ValueError(f"coding scheme designator longer than 16 characters: {self.scheme}")
        if len(self.meaning) > 64:
            raise ValueError(f"code meaning longer than 64 characters: {self.meaning}")


@dataclass(frozen=True)
class Evidence:
    """One instance (or frame) a result was computed from, so the SR can point at it."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None = None

    def __post_init__(self) -> None:
        """Frame numbers are 1-based in DICOM."""
        if self.frame_number is not None and self.frame_number < 1:
            raise ValueError(f"frame numbers start at 1, got {self.frame_number}")


@dataclass(frozen=True)
class Finding:
    """One classifier output (one measurement group in the SR).

    ``heatmaps`` are the explainability Secondary Captures of this output (see
    `daemon.report.heatmap`); the SR references each from the finding's group.
    ``model_format`` and ``runtime`` say what ran the model (e.g. ``onnx``,
    ``onnxruntime 1.32.0 (CPU, opset 17)``); empty for results recorded before they were.
    """

    model_name: str
    model_version: str
    weights_sha256: str
    level: Level
    finding: CodeSpec
    probability: float
    threshold: float
    evidence: tuple[Evidence, ...]
    clinical_use: bool
    heatmaps: tuple[Evidence, ...] = ()
    model_format: str = ""
    runtime: str = ""

    def __post_init__(self) -> None:
        """Reject outputs that cannot be reported truthfully."""
        if self.level not in ("image", "series"):
            raise ValueError(f"level must be 'image' or 'series', got {self.level!r}")
        if not _SHA256.match(self.weights_sha256):
            raise ValueError(f"weights_sha256 is not a lowercase sha256: {self.weights_sha256!r}")
        for name, number in (("probability", self.probability), ("threshold", self.threshold)):
            if not 0.0 <= number <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {number}")
        if not self.evidence:
            raise ValueError("a finding needs at least one evidence instance")
        if self.level == "image" and len(self.evidence) != 1:
            raise ValueError("an image-level finding references exactly one image")
        uids = [h.sop_instance_uid for h in self.heatmaps]
        if len(set(uids)) != len(uids):
            raise ValueError(f"a heatmap is referenced twice: {uids}")
        if set(uids) & {e.sop_instance_uid for e in self.evidence}:
            raise ValueError("a heatmap cannot also be the evidence it explains")

    @property
    def model_key(self) -> str:
        """Identify the exact model that ran, so report UIDs change when the model does."""
        return model_key(self.model_name, self.model_version, self.weights_sha256)

    def _tracking_sources(self) -> list[str]:
        """Same finding on the same instances gets the same tracking UID across report versions."""
        refs = [f"{e.sop_instance_uid}/{e.frame_number or 0}" for e in self.evidence]
        code = f"{self.finding.scheme}:{self.finding.value}"
        return [_TRACKING_NAMESPACE, self.model_name, self.level, code, *refs]

    @property
    def tracking_uid(self) -> str:
        """Deterministic Tracking Unique Identifier, stable across re-sends."""
        return hashed_uid(self._tracking_sources())

    @property
    def tracking_id(self) -> str:
        """Human-readable Tracking Identifier that stays distinct between groups."""
        digest = hashlib.sha256("\x1f".join(self._tracking_sources()).encode()).hexdigest()
        return f"{self.model_name} {self.level} {self.finding.meaning} {digest[:8]}"


@dataclass(frozen=True)
class SeriesFailure:
    """A series whose analysis failed: the report says so instead of staying silent."""

    series_uid: str
    model_name: str
    error: str

    @property
    def text(self) -> str:
        """Sentence that goes into the report."""
        error = " ".join(self.error.split())[:1000]
        return f"Analysis of series {self.series_uid} by model {self.model_name} failed: {error}"


@dataclass(frozen=True)
class DeviceInfo:
    """The daemon as the SR's device observer and equipment."""

    ae_title: str
    software_version: str
    device_uid: str
    manufacturer: str = "pacs-ai"


def model_key(name: str, version: str, weights_sha256: str) -> str:
    """One string per exact model, the unit that report UIDs are derived from."""
    return f"{name}@{version}#{weights_sha256}"
