"""`[[sources]]` and the new `[assembly]` keys: validated at start, naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.assemble import Waits
from daemon.config import ConfigError, dump_settings, load_settings

SOURCES = """
[dicom]
allowed_callers = ["ROUTER"]

[[sources]]
name = "ct1"
ae_title = "CT01"
host = "ct01.example.org"
port = 104

[[sources]]
name = "mr1"
ae_title = "MR01"
host = "mr01.example.org"
port = 11112
tls = { certificate = "/etc/pacs-ai/tls/c.crt", key = "/etc/pacs-ai/tls/c.key" }
"""


def load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "pacs-ai.toml"
    path.write_text(text)
    return load_settings(path, {})


def test_sources_are_accepted_callers_and_found_by_ae_title(tmp_path: Path) -> None:
    settings = load(tmp_path, SOURCES)
    assert settings.accepted_callers == ["ROUTER", "CT01", "MR01"]
    source = settings.source_for("MR01 ")
    assert source is not None and source.port == 11112 and source.tls is not None
    assert settings.source_for("STRANGER") is None
    assert "[[sources]]" in dump_settings(settings) and 'ae_title = "CT01"' in dump_settings(
        settings
    )


def test_open_receiver_stays_open_with_sources(tmp_path: Path) -> None:
    settings = load(tmp_path, SOURCES.replace('allowed_callers = ["ROUTER"]', ""))
    assert settings.accepted_callers == []


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (SOURCES.replace('ae_title = "MR01"', 'ae_title = "CT01"'), "source ae_title 'CT01'"),
        (SOURCES.replace('name = "mr1"', 'name = "ct1"'), "source name 'ct1'"),
        (SOURCES.replace("port = 104", "port = 0"), "sources.0.port: must be between"),
        (SOURCES.replace('ae_title = "CT01"', 'ae_title = "A\\\\B"'), "sources.0.ae_title"),
        ("[assembly]\nevidence_seconds = -1\n", "assembly.evidence_seconds"),
        ("[assembly]\nmpps_expire_hours = 0\n", "assembly.mpps_expire_hours"),
    ],
    ids=["ae-twice", "name-twice", "port", "ae-title", "evidence", "expiry"],
)
def test_bad_source_or_assembly_key_names_the_field(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        load(tmp_path, text)


def test_evidence_is_in_force_only_when_shorter_than_the_quiet_window(tmp_path: Path) -> None:
    assert Waits.from_settings(load(tmp_path, "")).evidence == 2.0
    off = load(tmp_path, "[assembly]\nquiet_seconds = 1\n")
    assert Waits.from_settings(off).evidence is None
    assert (
        Waits.from_settings(load(tmp_path, "[assembly]\nevidence_seconds = 0\n")).evidence is None
    )
