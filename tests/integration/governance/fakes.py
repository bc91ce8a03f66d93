"""Stand-ins for loaded models and their runs, so analyse can be specified without Keras."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import numpy as np

from models.manifest import Manifest

WEIGHTS = {"cnn-a": "aa" * 32, "cnn-b": "bb" * 32, "lstm-a": "cc" * 32}


def manifest(name: str, *, kind: str = "cnn", shadow: bool = False, cnn: str = "cnn-a") -> Manifest:
    """A valid manifest with two classes; an LSTM stacks on `cnn`."""
    fields: dict[str, Any] = {
        "name": name,
        "version": "1.0",
        "kind": kind,
        "classes": [
            {"name": "normal", "code": {"scheme": "99T", "value": "N", "meaning": "Normal"}},
            {
                "name": "nodule",
                "code": {"scheme": "99T", "value": "NOD", "meaning": "Nodule"},
                "threshold": 0.4,
            },
        ],
        "weights_file": "w.keras",
        "weights_sha256": WEIGHTS[name],
        "intended_use": "tests",
        "clinical_use": False,
        "shadow": shadow,
    }
    if kind == "cnn":
        fields["input_shape"] = (32, 32, 3)
    else:
        fields["embedding_model"] = cnn
    return Manifest(**fields)


def loaded(m: Manifest) -> SimpleNamespace:
    """What the registry holds for a model: its name, manifest and identity."""
    identity = SimpleNamespace(format=m.format, runtime="fake runtime 1.0")
    return SimpleNamespace(name=m.name, manifest=m, identity=identity)


@dataclasses.dataclass(frozen=True)
class FakeRegistry:
    """The fields analyse reads from `models.registry.Registry`."""

    cnns: tuple[Any, ...]
    lstms: tuple[Any, ...] = ()
    volumes: tuple[Any, ...] = ()

    @property
    def models(self) -> tuple[Any, ...]:
        """Every model, as `Registry.models`."""
        return (*self.cnns, *self.lstms, *self.volumes)


def series_result(cnn: Manifest, lstms: tuple[Manifest, ...] = (), images: int = 2) -> Any:
    """A run of `cnn` (and its LSTMs) over `images` single-frame images."""
    rows = tuple(SimpleNamespace(sop_instance_uid=f"1.2.9.{i}", frame=None) for i in range(images))
    return SimpleNamespace(
        cnn=cnn,
        rows=rows,
        image_probabilities=np.array([[0.7, 0.3]] * images, dtype=np.float32),
        series=tuple(
            SimpleNamespace(manifest=m, probabilities=np.array([0.2, 0.8])) for m in lstms
        ),
        ordering=SimpleNamespace(
            method="position", spacing_mm=1.0, gaps=(), duplicates=(), notes=()
        ),
    )
