"""Deterministic UIDs, so that sending a report twice can never make two reports."""

from __future__ import annotations

from collections.abc import Sequence

from daemon.uids import hashed_uid

_SR_NAMESPACE = "pacs-ai/sr/v1"
_SERIES_NAMESPACE = "pacs-ai/sr-series/v1"
_MODEL_DEVICE_NAMESPACE = "pacs-ai/model-device/v1"


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
