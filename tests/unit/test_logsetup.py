"""Log lines are one per record, `key=value` fields, journald-aware; tracebacks only at debug."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import pytest

from daemon.logsetup import kv, setup_logging

NOISY = ("pynetdicom", "apscheduler", "alembic", "tensorflow", "absl", "h5py")
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture
def stream(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """What the root logger writes, outside journald; the root is restored afterwards."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, {n: logging.getLogger(n).level for n in NOISY})
    yield io.StringIO()
    handlers, level, noisy = saved
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, noisy_level in noisy.items():
        logging.getLogger(name).setLevel(noisy_level)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def raise_and_log(log: logging.Logger) -> None:
    try:
        raise ValueError("no pixel data")
    except ValueError:
        log.exception("decode failed", extra=kv(sop="1.2.3"))


def test_line_has_time_level_logger_message_and_fields(stream: io.StringIO) -> None:
    setup_logging("info", stream)
    logging.getLogger("pacs.receive").info("stored", extra=kv(sop="1.2.3", size=1024))
    (line,) = lines(stream)
    assert re.fullmatch(rf"{STAMP} INFO pacs\.receive stored sop=1\.2\.3 size=1024", line)


def test_each_level_is_named(stream: io.StringIO) -> None:
    setup_logging("debug", stream)
    log = logging.getLogger("pacs.levels")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    levels = [line.split(" ")[1] for line in lines(stream)]
    assert levels == ["DEBUG", "INFO", "WARNING", "ERROR"]


def test_records_below_the_level_are_dropped(stream: io.StringIO) -> None:
    setup_logging("warning", stream)
    logging.getLogger("pacs.quiet").info("not shown")
    assert stream.getvalue() == ""


def test_record_without_fields_is_logger_and_message(stream: io.StringIO) -> None:
    setup_logging("info", stream)
    logging.getLogger("pacs.plain").info("listening on %s:%d", "0.0.0.0", 11112)
    (line,) = lines(stream)
    assert re.fullmatch(rf"{STAMP} INFO pacs\.plain listening on 0\.0\.0\.0:11112", line)


def test_values_with_spaces_quotes_or_equals_are_quoted(stream: io.StringIO) -> None:
    setup_logging("info", stream)
    fields = kv(path="/spool/a b.dcm", note='say "hi"', expr="a=b", empty="", plain="x")
    logging.getLogger("pacs.q").info("wrote", extra=fields)
    (line,) = lines(stream)
    assert line.endswith(
        ' wrote path="/spool/a b.dcm" note="say \\"hi\\"" expr="a=b" empty="" plain=x'
    )


def test_newline_in_a_value_stays_on_one_line(stream: io.StringIO) -> None:
    setup_logging("info", stream)
    logging.getLogger("pacs.nl").info("refused", extra=kv(reason="first\nsecond"))
    (line,) = lines(stream)
    assert line.endswith(' refused reason="first\\nsecond"')


def test_under_journald_lines_start_with_priority_and_carry_no_time(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    setup_logging("debug", stream)
    log = logging.getLogger("pacs.journal")
    log.debug("d", extra=kv(n=1))
    log.info("stored", extra=kv(sop="1.2.3"))
    log.warning("w")
    log.error("e")
    log.critical("c")
    assert lines(stream) == [
        "<7>pacs.journal d n=1",
        "<6>pacs.journal stored sop=1.2.3",
        "<4>pacs.journal w",
        "<3>pacs.journal e",
        "<2>pacs.journal c",
    ]


def test_exception_above_debug_is_one_line_without_traceback(stream: io.StringIO) -> None:
    setup_logging("info", stream)
    raise_and_log(logging.getLogger("pacs.analyse"))
    (line,) = lines(stream)
    assert "Traceback" not in stream.getvalue()
    expected = ' ERROR pacs.analyse decode failed sop=1.2.3 exc="ValueError: no pixel data"'
    assert line.endswith(expected)


def test_exception_at_debug_carries_the_traceback(stream: io.StringIO) -> None:
    setup_logging("debug", stream)
    raise_and_log(logging.getLogger("pacs.analyse"))
    text = stream.getvalue()
    assert re.match(rf"{STAMP} ERROR pacs\.analyse decode failed sop=1\.2\.3 ?\n", text)
    assert "Traceback (most recent call last)" in text
    assert "ValueError: no pixel data" in text
    assert "raise_and_log" in text


def test_library_chatter_is_quieted_unless_debugging(stream: io.StringIO) -> None:
    setup_logging("info", stream)
    assert logging.getLogger("pynetdicom").level == logging.WARNING
    logging.getLogger("pynetdicom.assoc").info("Patient Name: DOE^JOHN")
    assert stream.getvalue() == ""
    setup_logging("debug", stream)
    assert logging.getLogger("pynetdicom").level == logging.DEBUG


def test_setup_twice_leaves_one_handler(stream: io.StringIO) -> None:
    setup_logging("info", stream)
    setup_logging("info", stream)
    logging.getLogger("pacs.once").info("started")
    assert len(lines(stream)) == 1


def _refused_association() -> None:
    """Request an association from a port nobody listens on, as the dispatcher would."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from tests.peers import free_port

    ae = AE(ae_title="PACSAI")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", free_port())
    assert not assoc.is_established


def test_a_refused_association_we_asked_for_leaves_no_pynetdicom_lines(
    stream: io.StringIO,
) -> None:
    # The dispatcher reports the outcome in one WARNING of its own; pynetdicom's two ERROR
    # lines would say the same without naming the destination.
    setup_logging("info", stream)
    _refused_association()
    assert lines(stream) == []


def test_debug_keeps_pynetdicom_lines_about_a_refused_association(stream: io.StringIO) -> None:
    setup_logging("debug", stream)
    _refused_association()
    assert any("TCP Initialisation Error" in line for line in lines(stream))


def test_other_pynetdicom_errors_are_kept(stream: io.StringIO) -> None:
    setup_logging("info", stream)
    logging.getLogger("pynetdicom.association").error(
        "Exception in the handler bound to 'evt.EVT_C_STORE'"
    )
    logging.getLogger("pynetdicom.acse").error("Received an invalid A-ASSOCIATE response")
    assert len(lines(stream)) == 2
