"""Settings come from one TOML file plus PACSAI_* variables; every problem is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import ConfigError, Settings, config_file, dump_settings, load_settings

FULL_TOML = """
[dicom]
ae_title = "AI_NODE"
bind = "127.0.0.1"
port = 4242
allowed_callers = ["MODALITY1", "PACS"]
max_associations = 8
processes = 2
acse_timeout = 10.0
dimse_timeout = 20.0
network_timeout = 25.0
max_pdu = 65536
drain_seconds = 5.0

[dicom.tls]
certificate = "/etc/pacs-ai/server.crt"
key = "/etc/pacs-ai/server.key"
ca = "/etc/pacs-ai/ca.pem"

[storage]
spool_dir = "/srv/pacs-ai/spool"
database_url = "postgresql://pacsai@db/pacsai"
min_free_mb = 2048

[assembly]
quiet_seconds = 12.5
sweep_seconds = 3.0

[workers]
count = 3
lease_seconds = 90.0
poll_seconds = 0.5

[models]
dir = "/srv/pacs-ai/models"

[retry]
base_seconds = 5.0
factor = 3.0
cap_seconds = 600.0
max_attempts = 7
jitter = 0.2

[metrics]
bind = "0.0.0.0"
port = 0

[[destinations]]
name = "main-pacs"
ae_title = "MAINPACS"
host = "pacs.example.org"
port = 104
verify = "commitment"

[[destinations]]
name = "archive"
ae_title = "ARCHIVE"
host = "10.0.0.7"
port = 11112

[destinations.tls]
certificate = "/etc/pacs-ai/client.crt"
key = "/etc/pacs-ai/client.key"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pacs-ai.toml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    """The one-line message load_settings raises for a file with `text`."""
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), environ or {})
    return str(info.value)


def test_defaults_need_no_file() -> None:
    settings = load_settings(None, {})
    assert settings.dicom.ae_title == "PACSAI"
    assert settings.dicom.port == 11112
    assert settings.destinations == []
    assert settings.storage.database_url is None


def test_database_defaults_to_sqlite_beside_the_spool(tmp_path: Path, spool_dir: Path) -> None:
    settings = load_settings(write(tmp_path, f'[storage]\nspool_dir = "{spool_dir}"\n'), {})
    expected = spool_dir.parent.absolute() / "pacs-ai.db"
    assert settings.storage.effective_database_url == f"sqlite:///{expected}"


def test_default_database_is_beside_the_default_spool() -> None:
    settings = load_settings(None, {})
    assert settings.storage.effective_database_url == "sqlite:////var/lib/pacs-ai/pacs-ai.db"


def test_configured_database_url_is_used_as_given(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, '[storage]\ndatabase_url = "postgresql://x/y"\n'), {})
    assert settings.storage.effective_database_url == "postgresql://x/y"


def test_full_file_sets_every_section(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, FULL_TOML), {})
    assert (s.dicom.ae_title, s.dicom.bind, s.dicom.port) == ("AI_NODE", "127.0.0.1", 4242)
    assert s.dicom.allowed_callers == ["MODALITY1", "PACS"]
    assert (s.dicom.max_associations, s.dicom.processes, s.dicom.max_pdu) == (8, 2, 65536)
    assert (s.dicom.acse_timeout, s.dicom.dimse_timeout) == (10.0, 20.0)
    assert (s.dicom.network_timeout, s.dicom.drain_seconds) == (25.0, 5.0)
    assert s.dicom.tls is not None
    assert s.dicom.tls.certificate == Path("/etc/pacs-ai/server.crt")
    assert s.dicom.tls.key == Path("/etc/pacs-ai/server.key")
    assert s.dicom.tls.ca == Path("/etc/pacs-ai/ca.pem")
    assert s.storage.spool_dir == Path("/srv/pacs-ai/spool")
    assert s.storage.effective_database_url == "postgresql://pacsai@db/pacsai"
    assert s.storage.min_free_mb == 2048
    assert (s.assembly.quiet_seconds, s.assembly.sweep_seconds) == (12.5, 3.0)
    assert (s.workers.count, s.workers.lease_seconds, s.workers.poll_seconds) == (3, 90.0, 0.5)
    assert s.models.dir == Path("/srv/pacs-ai/models")
    assert s.retry.model_dump() == {
        "base_seconds": 5.0,
        "factor": 3.0,
        "cap_seconds": 600.0,
        "max_attempts": 7,
        "jitter": 0.2,
    }
    assert (s.metrics.bind, s.metrics.port) == ("0.0.0.0", 0)
    main, archive = s.destinations
    assert (main.name, main.ae_title, main.host, main.port) == (
        "main-pacs",
        "MAINPACS",
        "pacs.example.org",
        104,
    )
    assert main.verify == "commitment"
    assert main.tls is None
    assert (archive.name, archive.port, archive.verify) == ("archive", 11112, "none")
    assert archive.tls is not None
    assert archive.tls.ca is None
    assert s.destination("archive") is archive


def test_unknown_destination_name_lists_the_known_ones(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, FULL_TOML), {})
    with pytest.raises(ConfigError, match=r"^destinations: .*'nowhere'.*main-pacs, archive"):
        s.destination("nowhere")


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[dicom]\nae_title = "FROMFILE"\nport = 4242\n')
    settings = load_settings(path, {"PACSAI_DICOM__PORT": "104"})
    assert settings.dicom.port == 104
    assert settings.dicom.ae_title == "FROMFILE"


def test_environment_overrides_a_nested_default_without_a_file() -> None:
    settings = load_settings(None, {"PACSAI_RETRY__MAX_ATTEMPTS": "3"})
    assert settings.retry.max_attempts == 3
    assert settings.retry.base_seconds == 30.0


def test_only_the_given_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACSAI_DICOM__PORT", "104")
    assert load_settings(None, {}).dicom.port == 11112
    assert load_settings(None, None).dicom.port == 104


def test_pacsai_config_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[dicom]\nae_title = "VIAENV"\n')
    settings = load_settings(None, {"PACSAI_CONFIG": str(path)})
    assert settings.dicom.ae_title == "VIAENV"


def test_explicit_path_wins_over_pacsai_config(tmp_path: Path) -> None:
    path = write(tmp_path, '[dicom]\nae_title = "EXPLICIT"\n')
    settings = load_settings(path, {"PACSAI_CONFIG": str(tmp_path / "elsewhere.toml")})
    assert settings.dicom.ae_title == "EXPLICIT"


@pytest.mark.parametrize(
    "toml_value",
    [
        pytest.param('""', id="empty"),
        pytest.param('"   "', id="blank"),
        pytest.param('"ABCDEFGHIJKLMNOPQ"', id="17-chars"),
        pytest.param('"AI\\\\NODE"', id="backslash"),
        pytest.param('"AI\\u0007NODE"', id="control-char"),
        pytest.param('"AI\\u007fNODE"', id="delete-char"),
    ],
)
def test_bad_ae_title_is_rejected_naming_the_field(tmp_path: Path, toml_value: str) -> None:
    message = config_error(tmp_path, f"[dicom]\nae_title = {toml_value}\n")
    assert message.startswith("dicom.ae_title: ")
    assert "AE title" in message
    assert "\n" not in message


def test_sixteen_character_ae_title_is_accepted(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, '[dicom]\nae_title = "ABCDEFGHIJKLMNOP"\n'), {})
    assert settings.dicom.ae_title == "ABCDEFGHIJKLMNOP"


def test_bad_ae_title_from_the_environment_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"^dicom\.ae_title: AE title must not be blank$"):
        load_settings(None, {"PACSAI_DICOM__AE_TITLE": "  "})


def test_bad_allowed_caller_names_its_position(tmp_path: Path) -> None:
    message = config_error(tmp_path, '[dicom]\nallowed_callers = ["OK", "A\\\\B"]\n')
    assert message.startswith("dicom.allowed_callers.1: AE title")


def test_bad_destination_ae_title_names_the_destination_field(tmp_path: Path) -> None:
    text = '[[destinations]]\nname = "p"\nae_title = ""\nhost = "h"\nport = 104\n'
    assert config_error(tmp_path, text).startswith("destinations.0.ae_title: ")


@pytest.mark.parametrize("port", [0, 70000, -1, 65536])
def test_port_out_of_range_is_one_exact_line(tmp_path: Path, port: int) -> None:
    message = config_error(tmp_path, f"[dicom]\nport = {port}\n")
    assert message == "dicom.port: must be between 1 and 65535"


@pytest.mark.parametrize("port", [1, 65535])
def test_port_range_ends_are_accepted(tmp_path: Path, port: int) -> None:
    assert load_settings(write(tmp_path, f"[dicom]\nport = {port}\n"), {}).dicom.port == port


def test_port_out_of_range_from_the_environment_is_the_same_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"PACSAI_DICOM__PORT": "70000"})
    assert str(info.value) == "dicom.port: must be between 1 and 65535"


def test_unknown_top_level_key_is_named(tmp_path: Path) -> None:
    assert config_error(tmp_path, "colour = 1\n") == "colour: unknown key"


def test_unknown_top_level_section_is_named(tmp_path: Path) -> None:
    message = config_error(tmp_path, "[dicomm]\nport = 104\n")
    assert message == "dicomm: unknown key (did you mean dicom?)"


def test_unknown_key_in_a_section_is_named_with_the_key_it_resembles(tmp_path: Path) -> None:
    assert (
        config_error(tmp_path, "[dicom]\naetitle = 'X'\n")
        == "dicom.aetitle: unknown key (did you mean ae_title?)"
    )


def test_a_misspelt_destination_key_is_named_before_the_key_it_leaves_missing(
    tmp_path: Path,
) -> None:
    text = '[[destinations]]\nname = "p"\naetitle = "P"\nhost = "h"\nport = 104\n'
    assert (
        config_error(tmp_path, text)
        == "destinations.0.aetitle: unknown key (did you mean ae_title?)"
    )


def test_unknown_key_in_a_destination_is_named(tmp_path: Path) -> None:
    text = '[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 104\nuser = "x"\n'
    assert config_error(tmp_path, text) == "destinations.0.user: unknown key"


def test_wrong_type_names_the_field(tmp_path: Path) -> None:
    message = config_error(tmp_path, '[dicom]\nport = "eleven"\n')
    assert message.startswith("dicom.port: ")
    assert "integer" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[dicom]\nport = "4343"\n', 'dicom.port: must be an integer, not a string ("4343")'),
        ("[dicom]\nport = 104.0\n", "dicom.port: must be an integer, not a number (104.0)"),
        ("[dicom]\nport = true\n", "dicom.port: must be an integer, not a boolean (true)"),
        ('[report]\nno_model_sr = "yes"\n', 'report.no_model_sr: must be true or false, not a '
         'string ("yes")'),
        ('[assembly]\nquiet_seconds = "30"\n', 'assembly.quiet_seconds: must be a number, not a '
         'string ("30")'),
        ('[models]\nshadow = "demo"\n', 'models.shadow: must be an array, not a string ("demo")'),
        ('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = "104"\n',
         'destinations.0.port: must be an integer, not a string ("104")'),
    ],
)
def test_a_value_of_the_wrong_toml_type_is_refused_even_when_it_would_convert(
    tmp_path: Path, text: str, message: str
) -> None:
    assert config_error(tmp_path, text) == message


def test_integers_are_accepted_where_seconds_are_numbers(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "[assembly]\nquiet_seconds = 30\n"), {})
    assert settings.assembly.quiet_seconds == 30.0


def test_environment_values_are_text_and_still_convert(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, "[dicom]\nport = 104\n"),
        {"PACSAI_DICOM__PORT": "4343", "PACSAI_REPORT__NO_MODEL_SR": "false"},
    )
    assert settings.dicom.port == 4343 and settings.report.no_model_sr is False


def test_without_a_config_argument_the_default_file_is_read_when_it_exists(
    tmp_path: Path,
) -> None:
    default = write(tmp_path, "[dicom]\nport = 4242\n")
    assert load_settings(None, {}, default=default).dicom.port == 4242
    assert config_file(None, {}, default=default) == default


def test_without_a_config_argument_or_default_file_the_defaults_apply(tmp_path: Path) -> None:
    missing = tmp_path / "etc" / "pacs-ai.toml"
    assert load_settings(None, {}, default=missing).dicom.port == 11112
    assert config_file(None, {}, default=missing) is None


def test_pacsai_config_wins_over_the_default_file(tmp_path: Path) -> None:
    default = write(tmp_path, "[dicom]\nport = 4242\n")
    chosen = tmp_path / "chosen.toml"
    chosen.write_text("[dicom]\nport = 4343\n")
    environ = {"PACSAI_CONFIG": str(chosen)}
    assert load_settings(None, environ, default=default).dicom.port == 4343


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("", "early_seconds = 0.5  # not set: the default 0.5 s, shorter than quiet_seconds"),
        ("quiet_seconds = 0.3\n", "early_seconds = 0  # not set, and quiet_seconds (0.3) is "
         "not longer than the default 0.5 s: early analysis off"),
        ("early_seconds = 0\n", "early_seconds = 0  # early analysis off"),
        ("early_seconds = 2\n", "early_seconds = 2.0  # as set"),
    ],
)
def test_config_check_prints_the_early_window_in_force_and_why(
    tmp_path: Path, text: str, line: str
) -> None:
    path = write(tmp_path, "[assembly]\n" + text)
    dumped = dump_settings(load_settings(path, {}), path)
    assert line in dumped.splitlines()
    assert f"# file: {path}" in dumped


def test_section_given_as_a_value_is_a_type_error(tmp_path: Path) -> None:
    assert config_error(tmp_path, "workers = 3\n").startswith("workers: ")


def test_corrupt_toml_is_one_line_naming_the_file(tmp_path: Path) -> None:
    message = config_error(tmp_path, "[dicom\nport = 104\n")
    path = tmp_path / "pacs-ai.toml"
    assert message.startswith(f"{path}: invalid TOML")
    assert "line 1" in message
    assert "\n" not in message


def test_duplicate_destination_names_are_rejected(tmp_path: Path) -> None:
    one = '[[destinations]]\nname = "pacs"\nae_title = "{ae}"\nhost = "h"\nport = 104\n'
    message = config_error(tmp_path, one.format(ae="A") + one.format(ae="B"))
    assert "destination name 'pacs' is used twice" in message
    assert "\n" not in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    assert str(info.value) == f"{path}: file not found"


def test_missing_file_named_by_pacsai_config_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"PACSAI_CONFIG": str(path)})
    assert str(info.value) == f"{path}: file not found"


def test_settings_are_frozen() -> None:
    settings = load_settings(None, {})
    with pytest.raises(ValueError, match="frozen"):
        settings.dicom.port = 104  # type: ignore[misc]
    assert isinstance(settings, Settings)


def test_early_analysis_longer_than_the_quiet_window_is_refused(tmp_path: Path) -> None:
    message = config_error(tmp_path, "[assembly]\nquiet_seconds = 10\nearly_seconds = 10\n")
    assert message == (
        "assembly.early_seconds: must be less than quiet_seconds (0 turns early analysis off)"
    )


@pytest.mark.parametrize(
    ("table", "in_force"),
    [
        ("quiet_seconds = 10\nearly_seconds = 2\n", 2.0),
        ("quiet_seconds = 10\nearly_seconds = 0\n", None),
        ("quiet_seconds = 0.2\n", None),  # the default 0.5 s outlasts a short quiet window
    ],
)
def test_early_analysis_is_in_force_only_inside_the_quiet_window(
    tmp_path: Path, table: str, in_force: float | None
) -> None:
    settings = load_settings(write(tmp_path, f"[assembly]\n{table}"), {})
    assert settings.assembly.early_analysis_seconds == in_force


def test_a_short_quiet_window_with_the_default_early_window_survives_the_trip_to_a_worker(
    tmp_path: Path,
) -> None:
    # serve hands each worker its settings as model_dump(); the default must not come back
    # as an explicit early_seconds that the quiet window then refuses.
    settings = load_settings(write(tmp_path, "[assembly]\nquiet_seconds = 0.5\n"), {})
    again = Settings(**settings.model_dump(mode="json"))
    assert again.assembly.early_analysis_seconds is None
    assert again == settings


# [http] and DICOMweb destinations ---------------------------------------------------------

SHA = "ab" * 32


def test_http_is_off_by_default() -> None:
    http = load_settings(None, {}).http
    assert (http.port, http.tokens, http.anonymous, http.cors_origins) == (0, [], [], [])


def test_http_section_with_tokens_and_tls(tmp_path: Path) -> None:
    text = f"""
[http]
bind = "127.0.0.1"
port = 8042
max_body_mb = 512
header_timeout = 5
body_timeout = 20
body_min_rate_kb = 32
cors_origins = ["https://viewer.example.org"]

[http.tls]
certificate = "/etc/pacs-ai/https.crt"
key = "/etc/pacs-ai/https.key"
ca = "/etc/pacs-ai/clients-ca.pem"
client_role = "store"

[[http.tokens]]
name = "orthanc"
sha256 = "{SHA.upper()}"
role = "store"

[[http.tokens]]
name = "grafana"
sha256 = "{"cd" * 32}"
role = "read"
"""
    http = load_settings(write(tmp_path, text), {}).http
    assert (http.port, http.max_body_mb, http.header_timeout) == (8042, 512, 5.0)
    assert [(t.name, t.sha256, t.role) for t in http.tokens] == [
        ("orthanc", SHA, "store"),
        ("grafana", "cd" * 32, "read"),
    ]
    assert http.tls is not None and http.tls.client_role == "store"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[http]\nport = 70000\n", "http.port: must be between 0 (off) and 65535"),
        (
            '[http]\nanonymous = ["operator"]\n',
            "http.anonymous.0: Input should be 'store' or 'read'",
        ),
        (
            f'[[http.tokens]]\nname = "a"\nsha256 = "{SHA}"\nrole = "admin"\n',
            "http.tokens.0.role: Input should be 'store', 'read' or 'operator'",
        ),
        (
            '[[http.tokens]]\nname = "a"\nsha256 = "secret-token-itself"\nrole = "store"\n',
            "http.tokens.0.sha256: String should match pattern",
        ),
        (
            f'[[http.tokens]]\nname = "a"\nsha256 = "{SHA}"\nrole = "store"\n'
            f'[[http.tokens]]\nname = "b"\nsha256 = "{SHA}"\nrole = "read"\n',
            "http.tokens: Value error, token sha256",
        ),
        (
            '[http.tls]\ncertificate = "/c"\nkey = "/k"\nclient_role = "store"\n',
            "http.tls: client_role needs ca",
        ),
    ],
    ids=["port", "anonymous operator", "role", "not a sha256", "same sha256", "client role"],
)
def test_bad_http_settings_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    assert (
        config_error(tmp_path, text)
        .replace("Value error, ", "")
        .startswith(message.replace("Value error, ", ""))
    )


def test_dicomweb_destination_beside_a_dimse_one(tmp_path: Path) -> None:
    text = """
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "pacs"
port = 104

[[destinations]]
kind = "dicomweb"
name = "cloud"
url = "https://dicom.example.org/dicomweb/"
token = "s3cr3t"
verify = "qido"

[destinations.tls]
ca = "/etc/pacs-ai/cloud-ca.pem"
"""
    settings = load_settings(write(tmp_path, text), {})
    pacs, cloud = settings.destinations
    assert pacs.kind == "dimse"
    assert (cloud.kind, cloud.url, cloud.verify) == (
        "dicomweb",
        "https://dicom.example.org/dicomweb",
        "qido",
    )
    assert cloud.token is not None and cloud.token.get_secret_value() == "s3cr3t"
    dumped = dump_settings(settings)
    assert "s3cr3t" not in dumped and 'token = "**********"' in dumped


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('kind = "dicomweb"\nname = "c"\n', "destinations.0.url: Field required"),
        ('kind = "dicomweb"\nname = "c"\nurl = "ftp://x"\n', "destinations.0.url: must be an http"),
        (
            'kind = "dicomweb"\nname = "c"\nurl = "http://x"\nverify = "find"\n',
            "destinations.0.verify:",
        ),
        (
            'kind = "dicomweb"\nname = "c"\nurl = "http://x"\nae_title = "X"\n',
            "destinations.0.ae_title: unknown key",
        ),
        ('kind = "hl7"\nname = "c"\n', "destinations.0: kind must be 'dimse' or 'dicomweb'"),
        (
            'kind = "dicomweb"\nname = "c"\nurl = "http://x"\n'
            '[destinations.tls]\ncertificate = "/c"\n',
            "destinations.0.tls: Value error, certificate and key go together",
        ),
    ],
)
def test_bad_dicomweb_destination_names_the_field(tmp_path: Path, table: str, message: str) -> None:
    got = config_error(tmp_path, "[[destinations]]\n" + table)
    assert got.startswith(message.replace("Value error, ", "")), got


def test_http_token_prints_the_token_once_and_an_entry_that_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib
    import tomllib

    from daemon.cli import main

    assert main(["http", "token", "orthanc", "--role", "store"]) == 0
    out, err = capsys.readouterr()
    token = err.strip().splitlines()[-1]
    entry = tomllib.loads(out)["http"]["tokens"][0]
    assert entry == {
        "name": "orthanc",
        "sha256": hashlib.sha256(token.encode()).hexdigest(),
        "role": "store",
    }
    assert token not in out  # stdout can be appended to the configuration as it is
    http = load_settings(write(tmp_path, out), {}).http
    assert http.tokens[0].name == "orthanc"
    assert main(["http", "token", "no spaces", "--role", "read"]) == 2
