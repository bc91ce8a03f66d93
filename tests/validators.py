"""Run the independent DICOM validators on a file and parse each one's verdict.

dciodvfy (dicom3tools) works on any IOD, so Secondary Capture tests can use it alone;
PixelMed's DicomSRValidator and DCMTK's dsrdump are for Structured Reports. Tests call
:func:`require` first: a missing tool fails the test when ``CI`` is set and skips it
otherwise.

No verdict passes on silence: each needs its validator's positive marker (the IOD
dciodvfy recognised, PixelMed's "Root Template Validation Complete", the document type
dsrdump rendered), so a missing or non-DICOM file fails every check
(tests/interop/test_validator_checks.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

DCIODVFY = "dciodvfy"
DSRDUMP = "/usr/bin/dsrdump"  # by full path: DCMTK tools can be shadowed on PATH
JAVA = "java"
PIXELMED_CLASSPATH = ("/usr/share/java/pixelmed.jar", "/usr/share/java/commons-codec.jar")
PIXELMED_SR_VALIDATOR = "com.pixelmed.validate.DicomSRValidator"
# Java 17's XPath limits stop PixelMed half-way through an SR without these.
JAVA_XPATH_UNLIMITED = (
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
)
# A short-lived JVM: C1 only and the serial collector halve PixelMed's CPU time, same output.
JAVA_QUICK_START = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")
TIMEOUT_S = 180

_UNRECOGNIZED_SCHEME = re.compile(
    r"Unrecognized defined term <([^>]*)> for value \d+ of attribute <Coding Scheme Designator>"
)
# dciodvfy's first line on a file it read: the IOD's name and nothing else.
_IOD_NAME = re.compile(r"^[A-Za-z0-9]+$")
# dsrdump's first line on a document it rendered, e.g. "Comprehensive 3D SR Document".
_SR_DOCUMENT = re.compile(r"^[A-Za-z0-9 ]+ Document$")

# dicom3tools 2022 predates Device UID (0018,1002) in Contributing Equipment items, which
# IHE AIR asks for; it reports such an object as "Standard Extended" for it.
KNOWN_SR_WARNINGS = (
    "Attribute is not present in standard DICOM IOD - (0x0018,0x1002) UI Device UID",
    "Dicom dataset contains attributes not present in standard DICOM IOD - "
    "this is a Standard Extended SOP Class",
)
# Where neither body part nor laterality of the source is known, a capture's Laterality is
# present and empty (Type 2C, "unknown"), which dciodvfy only warns about.
KNOWN_SC_WARNINGS = (
    *KNOWN_SR_WARNINGS,
    "is only permitted to be empty when actually unknown",
)


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """One validator run, stdout and stderr together as the shell script reads them."""
    return subprocess.run(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        timeout=TIMEOUT_S,
        check=False,
    )


def missing_tools(*tools: str) -> list[str]:
    """Which of ``"dciodvfy"``, ``"pixelmed"``, ``"dsrdump"`` are not installed here."""
    present = {
        "dciodvfy": shutil.which(DCIODVFY) is not None,
        "dsrdump": Path(DSRDUMP).exists(),
        "pixelmed": shutil.which(JAVA) is not None
        and all(Path(p).exists() for p in PIXELMED_CLASSPATH),
    }
    unknown = set(tools) - present.keys()
    if unknown:
        raise ValueError(f"unknown validators: {sorted(unknown)}")
    return [tool for tool in tools if not present[tool]]


def require(*tools: str) -> None:
    """Skip the calling test when a validator is missing, or fail it under CI."""
    missing = missing_tools(*tools)
    if not missing:
        return
    reason = f"validators not installed: {', '.join(missing)}"
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure)")
    pytest.skip(reason)


@dataclass(frozen=True)
class DciodvfyVerdict:
    """What dciodvfy said: the IOD it recognised (first line), errors, warnings."""

    iod: str
    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    output: str

    @property
    def ok(self) -> bool:
        """Recognised an IOD and found no Error or Abort (a missing file aborts)."""
        return bool(self.iod) and not self.errors

    def unrecognized_coding_schemes(self) -> set[str]:
        """Coding Scheme Designators dciodvfy does not know (private ones must be declared)."""
        return {m.group(1) for w in self.warnings if (m := _UNRECOGNIZED_SCHEME.search(w))}

    def warnings_except_coding_schemes(self) -> tuple[str, ...]:
        """The warnings that are not about coding scheme designators."""
        return tuple(w for w in self.warnings if not _UNRECOGNIZED_SCHEME.search(w))

    def unexpected_warnings(self, known: tuple[str, ...]) -> list[str]:
        """Warnings, coding schemes aside, that none of the `known` ones explain."""
        return [
            w for w in self.warnings_except_coding_schemes() if not any(k in w for k in known)
        ]


def run_dciodvfy(path: str | os.PathLike[str]) -> DciodvfyVerdict:
    """Validate any DICOM file against its IOD with dicom3tools' dciodvfy."""
    output = _run([DCIODVFY, os.fspath(path)]).stdout
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    errors = tuple(line for line in lines if line.startswith(("Error", "Abort")))
    warnings = tuple(line for line in lines if line.startswith("Warning"))
    first = lines[0].strip() if lines else ""
    iod = first if _IOD_NAME.match(first) else ""
    return DciodvfyVerdict(iod=iod, errors=errors, warnings=warnings, output=output)


@dataclass(frozen=True)
class PixelMedVerdict:
    """What PixelMed's DicomSRValidator said about an SR's templates."""

    error_lines: tuple[str, ...]
    warning_lines: tuple[str, ...]
    root_template_validated: bool
    output: str

    @property
    def ok(self) -> bool:
        """No error or exception line, and the root template (e.g. TID 1500) was checked."""
        return self.root_template_validated and not self.error_lines


def run_pixelmed_sr(path: str | os.PathLike[str]) -> PixelMedVerdict:
    """Validate an SR's IOD and content tree templates with PixelMed."""
    argv = [
        JAVA,
        *JAVA_QUICK_START,
        *JAVA_XPATH_UNLIMITED,
        "-cp",
        ":".join(PIXELMED_CLASSPATH),
        PIXELMED_SR_VALIDATOR,
        os.fspath(path),
    ]
    output = _run(argv).stdout
    lines = output.splitlines()
    errors = tuple(line for line in lines if re.search("error|exception", line, re.IGNORECASE))
    warnings = tuple(line for line in lines if re.search("warning", line, re.IGNORECASE))
    root = any("Root Template Validation Complete" in line for line in lines)
    return PixelMedVerdict(
        error_lines=errors, warning_lines=warnings, root_template_validated=root, output=output
    )


@dataclass(frozen=True)
class DsrdumpVerdict:
    """Whether DCMTK could parse and render the SR document, and which kind it rendered."""

    returncode: int
    document: str
    output: str

    @property
    def ok(self) -> bool:
        """dsrdump read the whole document tree (exit 0) and named the document it rendered."""
        return self.returncode == 0 and bool(self.document)


def run_dsrdump(path: str | os.PathLike[str]) -> DsrdumpVerdict:
    """Parse an SR with DCMTK's dsrdump."""
    result = _run([DSRDUMP, os.fspath(path)])
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    document = first if _SR_DOCUMENT.match(first) else ""
    return DsrdumpVerdict(returncode=result.returncode, document=document, output=result.stdout)
