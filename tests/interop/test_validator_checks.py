"""The validator checks cannot pass on silence: each needs its tool's positive marker, so
a missing file or one that is not DICOM fails every check (tests/validators.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.validators import require, run_dciodvfy, run_dsrdump, run_pixelmed_sr

CHECKS: dict[str, tuple[Callable[[Path], Any], Callable[[Any], object]]] = {
    # validator: (run it, its positive marker)
    "dciodvfy": (run_dciodvfy, lambda v: v.iod),
    "pixelmed": (run_pixelmed_sr, lambda v: v.root_template_validated),
    "dsrdump": (run_dsrdump, lambda v: v.document),
}


def _missing(folder: Path) -> Path:
    return folder / "never-written.dcm"


def _not_dicom(folder: Path) -> Path:
    path = folder / "report.dcm"
    path.write_text("Comprehensive3DSR\nRoot Template Validation Complete\n")
    return path


def _truncated(folder: Path) -> Path:
    path = folder / "truncated.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\2\0\0\0UL\4\0")
    return path


@pytest.mark.parametrize("make", [_missing, _not_dicom, _truncated], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("validator", CHECKS)
def test_a_file_that_is_not_a_dicom_object_fails_the_check(
    tmp_path: Path, validator: str, make: Callable[[Path], Path]
) -> None:
    require(validator)
    run, marker = CHECKS[validator]
    verdict = run(make(tmp_path))
    assert not verdict.ok, verdict.output
    assert not marker(verdict), verdict.output
