"""The spool: files appear whole and durable or not at all; refused input is kept with why."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from daemon import spool as spool_module
from daemon.spool import InvalidUID, Spool, uid_name


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool")
    s.prepare()
    return s


def test_instance_path_follows_study_series_instance(spool: Spool) -> None:
    path = spool.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert path == spool.root / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"


UNSAFE_UIDS = ["", "../../etc", "..", "1.2/3", "1.2\\3", "1.2" + ".4" * 40, "1..2", "1\n3", "1\x7f"]


@pytest.mark.parametrize("uid", UNSAFE_UIDS)
def test_unsafe_uids_do_not_become_paths(spool: Spool, uid: str) -> None:
    with pytest.raises(InvalidUID):
        spool.instance_path("1.2", "1.3", uid)


def test_a_malformed_but_harmless_uid_gets_an_encoded_name_of_its_own(spool: Spool) -> None:
    hex_uid = "dccc9599087131742838cc1162a630fea87ba9bf61ac09bfda90d4adfa5ddaed"
    path = spool.instance_path(hex_uid, "1.2.abc", ".")
    assert path == spool.root / f"~{hex_uid}" / "~1.2.abc" / "~..dcm"
    names = {uid_name(uid) for uid in ("1.2", "~1.2", "1.2 ", "1.2%20", "a b", "a%20b", ".", "0.1")}
    assert len(names) == 8, "two UIDs share a name"
    assert uid_name("01.002") == "01.002", "plain digits and dots name themselves"


def test_write_atomic_returns_size_and_sha256_and_leaves_no_temp(spool: Spool) -> None:
    path = spool.instance_path("1.2", "1.3", "1.4")
    size, sha = spool.write_atomic(path, b"abc" * 1000)
    assert (size, sha) == (3000, hashlib.sha256(b"abc" * 1000).hexdigest())
    assert path.read_bytes() == b"abc" * 1000
    assert list(spool.tmp_dir.iterdir()) == []


def test_write_atomic_replaces_whole_file(spool: Spool) -> None:
    path = spool.instance_path("1.2", "1.3", "1.4")
    spool.write_atomic(path, b"old" * 10)
    spool.write_atomic(path, b"new")
    assert path.read_bytes() == b"new"


def test_failed_fsync_leaves_neither_temp_nor_final_file(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool_module.os, "fsync", broken_fsync)
    path = spool.instance_path("1.2", "1.3", "1.4")
    with pytest.raises(OSError):
        spool.write_atomic(path, b"data")
    assert not path.exists()
    assert list(spool.tmp_dir.iterdir()) == []


def test_keep_aside_links_by_content_and_is_idempotent(spool: Spool) -> None:
    path = spool.instance_path("1.2", "1.3", "1.4")
    _, sha = spool.write_atomic(path, b"version one")
    aside = spool.keep_aside(path, sha)
    assert aside == spool.keep_aside(path, sha)
    assert aside.read_bytes() == b"version one"
    assert aside.name == f"1.4.{sha[:16]}.dcm"
    spool.write_atomic(path, b"version two")
    assert aside.read_bytes() == b"version one"


def test_quarantine_keeps_bytes_and_reason(spool: Spool) -> None:
    first = spool.quarantine(b"\x00garbage", "unparsable dataset", "calling_ae: CT01")
    second = spool.quarantine(b"more", "unparsable dataset", "calling_ae: CT01")
    assert first != second
    assert first.parent == spool.quarantine_dir
    assert first.read_bytes() == b"\x00garbage"
    note = first.with_suffix(".txt").read_text()
    assert "reason: unparsable dataset" in note and "calling_ae: CT01" in note
    assert hashlib.sha256(b"\x00garbage").hexdigest() in note


def test_prepare_removes_only_stale_temporary_files(spool: Spool) -> None:
    stale = spool.tmp_dir / "w-old.part"
    fresh = spool.tmp_dir / "w-new.part"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    spool.prepare()
    assert not stale.exists() and fresh.exists()


def test_free_space_probe_is_injectable(tmp_path: Path) -> None:
    s = Spool(tmp_path, free_bytes=lambda _p: 5 * 2**20)
    assert s.free_bytes() == 5 * 2**20
    assert s.has_room(4 * 2**20) and not s.has_room(6 * 2**20)


def test_real_free_space_is_positive(spool: Spool) -> None:
    assert spool.free_bytes() > 0


def test_report_path_is_under_reports(spool: Spool) -> None:
    assert spool.report_path("1.2", "1.9") == spool.reports_dir / "1.2" / "1.9.dcm"
