"""Alembic driven from code, so an installed package can upgrade its own database."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

import migrations
from daemon.db.engine import DatabaseNotAtHead, make_engine


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at the packaged migrations and `url`."""
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply every migration up to `revision` on `engine`'s database."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def head_revision() -> str:
    """The newest revision this code ships."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    head = script.get_current_head()
    if head is None:
        raise RuntimeError("no migrations are packaged")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, None when it was never upgraded."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def is_at_head(engine: Engine) -> bool:
    """Whether the database schema matches this code, so the service may start."""
    return current_revision(engine) == head_revision()


def require_head(engine: Engine) -> None:
    """Raise `DatabaseNotAtHead`, naming the database and both revisions, unless at head."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise DatabaseNotAtHead(
            f"database {engine.url} is at revision {current or 'none (empty)'}, "
            f"this version needs {head}"
        )


def open_at_head(url: str, *, pool_size: int = 1) -> Engine:
    """An engine on an existing database at this code's schema; never creates one.

    Raises `daemon.db.engine.DatabaseMissing` or `DatabaseNotAtHead`.
    """
    engine = make_engine(url, pool_size=pool_size, create=False)
    try:
        require_head(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine
