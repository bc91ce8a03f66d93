"""Name-based UIDs: the same inputs give the same UID, so a resend never makes a second object."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

# Fixed namespace of every name-based UUID this project derives (never change it).
_UUID_NAMESPACE = uuid.UUID("6f1c2a9e-8c3b-5d2e-9a41-7b0e3c5d9f10")


def hashed_uid(sources: Sequence[str]) -> str:
    """A 2.25 UID from a name-based UUID of the sources (PS3.5 B.2), the same every time.

    Not ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)``: with ``prefix=None``
    pydicom 3.0 ignores the entropy sources and returns a random UUID.
    """
    name = "\x1f".join(str(s) for s in sources)
    return f"2.25.{uuid.uuid5(_UUID_NAMESPACE, name).int}"
