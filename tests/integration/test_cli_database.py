"""Commands never create a database: a missing or stale one is one line saying what to run.

The trial that found this ran `pacs-ai status` without `--config`: it created
/var/lib/pacs-ai/pacs-ai.db, exited 0 and advised `db upgrade` on the wrong database.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from daemon.db import queue
from daemon.db.engine import make_engine
from tests.daemon_proc import PACS_AI, run_cli, write_config
from tests.peers import free_port

DATABASE_COMMANDS = [
    ("status", "--no-echo"),
    ("worker",),
    ("jobs", "list"),
    ("jobs", "show", "1"),
    ("jobs", "retry", "1"),
    ("jobs", "cancel", "1"),
    ("audit", "verify"),
    ("results", "compare", "model-a", "model-b"),
    ("replay", "1.2.3"),
    ("reports", "send", "--to", "pacs", "--study", "1.2.3"),
]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A configuration whose spool (and so its SQLite database) lies in a missing folder."""
    return write_config(
        tmp_path / "pacs-ai.toml",
        {
            "storage": {"spool_dir": tmp_path / "var" / "spool"},
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
            ],
        },
    )


@pytest.mark.parametrize("command", DATABASE_COMMANDS, ids=" ".join)
def test_a_missing_database_is_one_line_naming_it_and_nothing_is_created(
    tmp_path: Path, config: Path, command: tuple[str, ...]
) -> None:
    before = _tree(tmp_path)
    done = run_cli(config, *command)
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        f"pacs-ai: database sqlite:///{tmp_path}/var/pacs-ai.db does not exist: check "
        f"storage.database_url, or create it with `pacs-ai db upgrade --config {config}`\n"
    )
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("command", [("echo", "pacs"), ("config", "check")], ids=" ".join)
def test_commands_without_a_database_create_nothing(
    tmp_path: Path, config: Path, command: tuple[str, ...]
) -> None:
    before = _tree(tmp_path)
    done = run_cli(config, *command)
    assert done.returncode in (0, 1), done.stderr
    assert _tree(tmp_path) == before


def test_a_database_behind_head_is_one_line_naming_it_and_the_upgrade(
    tmp_path: Path, config: Path
) -> None:
    (tmp_path / "var").mkdir()
    sqlite3.connect(tmp_path / "var" / "pacs-ai.db").close()  # exists, never upgraded
    done = run_cli(config, "status", "--no-echo")
    assert done.returncode == 1
    assert done.stderr.startswith(
        f"pacs-ai: database sqlite:///{tmp_path}/var/pacs-ai.db is at revision none (empty), "
        "this version needs "
    )
    assert done.stderr.endswith(f": run `pacs-ai db upgrade --config {config}`\n")
    assert done.stderr.count("\n") == 1


def test_without_any_configuration_status_creates_nothing_in_var_lib(tmp_path: Path) -> None:
    default_config, default_dir = Path("/etc/pacs-ai/pacs-ai.toml"), Path("/var/lib/pacs-ai")
    if default_config.exists() or default_dir.exists():
        pytest.skip("this machine has a pacs-ai installation")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSAI_")}
    done = subprocess.run(
        [PACS_AI, "status", "--no-echo"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False,
    )
    assert done.returncode == 1
    assert "database sqlite:////var/lib/pacs-ai/pacs-ai.db does not exist" in done.stderr
    assert "pacs-ai db upgrade`" in done.stderr
    assert not default_dir.exists()


def test_jobs_list_into_a_reader_that_stops_early_ends_quietly(
    tmp_path: Path, config: Path
) -> None:
    assert run_cli(config, "db", "upgrade").returncode == 0
    engine = make_engine(f"sqlite:///{tmp_path}/var/pacs-ai.db")
    with engine.begin() as conn:
        for n in range(1500):  # ~150 KB of listing: more than a pipe holds
            queue.enqueue(conn, "analyse", f"analyse:1.2.3.{n}:v1", max_attempts=3)
    engine.dispose()
    proc = subprocess.Popen(
        [PACS_AI, "jobs", "list", "--limit", "5000", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith("    ID")  # what `| head -1` reads
    proc.stdout.close()
    assert proc.wait(60) == 0
    assert proc.stderr.read() == ""
