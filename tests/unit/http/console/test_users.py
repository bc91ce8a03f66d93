"""`[[http.users]]` and `pacs-ai http user`: argon2 hashes in, the password never out."""

from __future__ import annotations

import io
import tomllib
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from daemon.cli import main
from daemon.config import ConfigError, load_settings
from tests.unit.http.console.conftest import HASHER


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pacs-ai.toml"
    path.write_text(text)
    return path


def test_http_user_reads_a_password_from_stdin_and_prints_an_entry_that_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough secret\n"))
    assert main(["http", "user", "olga", "--role", "operator"]) == 0
    out, err = capsys.readouterr()
    assert "a long enough secret" not in out + err
    entry = tomllib.loads(out)["http"]["users"][0]
    assert (entry["name"], entry["role"]) == ("olga", "operator")
    assert PasswordHasher().verify(entry["password_hash"], "a long enough secret")
    users = load_settings(write(tmp_path, out), {}).http.users
    assert users[0].name == "olga"


def test_http_user_refuses_a_short_password(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["http", "user", "olga", "--role", "read"]) == 1
    assert "at least 10 characters" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('name = "a"\npassword_hash = "plain-password"\nrole = "read"\n',
         "http.users.0.password_hash: not an argon2 hash"),
        (f'name = "a"\npassword_hash = "{HASHER.hash("x")}"\nrole = "store"\n',
         "http.users.0.role: Input should be 'read' or 'operator'"),
        (f'name = "a b"\npassword_hash = "{HASHER.hash("x")}"\nrole = "read"\n',
         "http.users.0.name: String should match pattern"),
    ],
    ids=["not a hash", "store role", "name"],
)  # fmt: skip
def test_bad_users_name_the_field(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(write(tmp_path, "[[http.users]]\n" + table), {})
    assert str(error.value).replace("Value error, ", "").startswith(message)


def test_console_settings_have_safe_defaults_and_bounds(tmp_path: Path) -> None:
    http = load_settings(None, {}).http
    assert (http.users, http.session_minutes, http.show_patient_data) == ([], 480.0, False)
    twice = f'name = "a"\npassword_hash = "{HASHER.hash("x")}"\nrole = "read"\n'
    with pytest.raises(ConfigError, match="http.users: .*'a' is used twice"):
        load_settings(write(tmp_path, f"[[http.users]]\n{twice}[[http.users]]\n{twice}"), {})
    with pytest.raises(ConfigError, match="http.session_minutes"):
        load_settings(write(tmp_path, "[http]\nsession_minutes = 0\n"), {})
