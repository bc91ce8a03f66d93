"""What the SR says about how its study version ended: an incomplete or discontinued
procedure, as the modality's MPPS told us (daemon.assemble records it on the version)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Completion:
    """Statements for the report's Qualitative Evaluations, and whether it is partial."""

    notes: tuple[str, ...] = ()
    partial: bool = False

    @classmethod
    def from_detail(cls, detail: Mapping[str, Any] | None) -> Completion:
        """From a closed version's detail (daemon.db.schema.ClosedVersion.detail)."""
        detail = detail or {}
        notes = [
            f"Procedure discontinued by the modality (MPPS {d['step']}"
            + (f", reason: {d['reason']})." if d.get("reason") else ").")
            for d in detail.get("discontinued", [])
        ]
        notes += [
            f"Series {s['series']} incomplete: {s['arrived']} of the {s['expected']} instances "
            "the modality reported (MPPS) arrived before analysis."
            for s in detail.get("incomplete_series", [])
        ]
        return cls(tuple(notes), partial=bool(notes))
