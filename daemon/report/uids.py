"""Deterministic UIDs, so that sending a report twice can never make two reports."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

# Fixed namespace of every name-based UUID this project derives (never change it).
_UUID_NAMESPACE = uuid.UUID("6f1c2a9e-8c3b-5d2e-9a41-7b0e3c5d9f10")
_SR_NAMESPACE = "pacs-ai/sr/v1"
_SERIES_NAMESPACE = "pacs-ai/sr-series/v1"
_MODEL_DEVICE_NAMESPACE = "pacs-ai/model-device/v1"


def hashed_uid(sources: Sequence[str]) -> str:
    """A 2.25 UID from a name-based UUID of the sources (PS3.5 B.2), the same every time.

    Not ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)``: with ``prefix=None``
    pydicom 3.0 ignores the entropy sources and returns a random UUID.
    """
    name = "\x1f".join(str(s) for s in sources)
    return f"2.25.{uuid.uuid5(_UUID_NAMESPACE, name).int}"


def sr_uid(study_uid: str, study_version: int, model_keys: Sequence[str], variant: str = "") -> str:
    """SOP Instance UID of the report on one version of a study by one set of models.

    The order of ``model_keys`` does not matter; ``variant`` separates documents built
    from the same inputs (``"enhanced"`` for the Enhanced SR fallback,
    ``"no_applicable_model"``).
    """
    if study_version < 0:
        raise ValueError(f"study_version must not be negative, got {study_version}")
    keys = sorted(set(model_keys))
    return hashed_uid([_SR_NAMESPACE, study_uid, str(study_version), variant, *keys])


def series_uid(study_uid: str) -> str:
    """Series Instance UID shared by every report version on a study."""
    return hashed_uid([_SERIES_NAMESPACE, study_uid])


def model_device_uid(model_key: str) -> str:
    """Device UID of one exact model in Contributing Equipment (IHE AIR)."""
    return hashed_uid([_MODEL_DEVICE_NAMESPACE, model_key])
