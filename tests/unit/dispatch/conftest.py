"""Small report files and a fresh database for the dispatch tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import Comprehensive3DSRStorage, EnhancedSRStorage, generate_uid
from sqlalchemy import Engine

from daemon.db.engine import make_engine
from daemon.db.schema import Base
from tests.unit.dispatch.dicomfiles import write_instance


@pytest.fixture
def sr_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A Comprehensive 3D SR file and its Enhanced SR twin (own SOP Instance UID)."""
    study = generate_uid()
    main, fallback = tmp_path / "report.dcm", tmp_path / "report-enhanced.dcm"
    write_instance(main, Comprehensive3DSRStorage, study_uid=study)
    write_instance(fallback, EnhancedSRStorage, study_uid=study)
    return main, fallback


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """A fresh SQLite database with the declared schema."""
    eng = make_engine(f"sqlite:///{tmp_path / 'test.db'}")
    Base.metadata.create_all(eng)
    yield eng
    eng.dispose()
