"""One line per record, `key=value` fields, journald-aware; never patient data above DEBUG."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
LEVELS = ("debug", "info", "warning", "error")


def kv(**fields: Any) -> dict[str, Any]:
    """Structured fields for a log call: `log.info("stored", extra=kv(sop=uid))`."""
    return {"kv": fields}


def _render(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


# What pynetdicom logs, at ERROR and over several lines, when an association we request is
# refused, aborted or never connects. Our callers turn that outcome into a value and report
# it once, in a line of their own that names the destination (`daemon.dispatch.scu`).
_REQUEST_FAILURE_LOGGERS = frozenset({"pynetdicom.transport", "pynetdicom.acse"})
_REQUEST_FAILURE_LINES = (
    "Association request failed",
    "TCP Initialisation Error",
    "Association Rejected",
    "Result: ",
    "Reason: ",
    "Association Aborted",
    "No accepted presentation contexts",
    "ACSE timeout reached while waiting for response to association request",
)


class _RequestFailureFilter(logging.Filter):
    """Drop pynetdicom's lines about an association we asked for and did not get."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name not in _REQUEST_FAILURE_LOGGERS or record.levelno < logging.WARNING:
            return True
        return not str(record.msg).startswith(_REQUEST_FAILURE_LINES)


class LineFormatter(logging.Formatter):
    """`TIME LEVEL logger message k=v ...`, or `<prio>logger message k=v` under journald."""

    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "kv", None) or {}
        parts = [record.name, record.getMessage()]
        parts += [f"{k}={_render(v)}" for k, v in fields.items()]
        if record.exc_info and logging.getLogger().isEnabledFor(logging.DEBUG):
            parts.append("\n" + self.formatException(record.exc_info))
        elif record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            parts.append(f"exc={_render(f'{type(exc).__name__}: {exc}')}")
        line = " ".join(parts)
        if self.journald:
            return f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{line}"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z {record.levelname} {line}"


def setup_logging(level: str = "info", stream: Any = None) -> None:
    """Configure the root logger once per process; quiet the libraries' chatter."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(LineFormatter(journald=bool(os.environ.get("JOURNAL_STREAM"))))
    if level != "debug":
        handler.addFilter(_RequestFailureFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    quiet_libraries(level)


def quiet_libraries(level: str = "info") -> None:
    """Keep the libraries' chatter (and their patient data) out of the log unless debugging."""
    # pynetdicom logs identifiers (patient names) at INFO; keep it at WARNING unless debugging.
    noisy = logging.DEBUG if level == "debug" else logging.WARNING
    for name in ("pynetdicom", "apscheduler", "alembic", "tensorflow", "absl", "h5py", "highdicom"):
        logging.getLogger(name).setLevel(noisy)
    # uvicorn's start/stop chatter repeats our own lines; python-multipart warns about a
    # broken body the HTTP layer already refuses in one line of its own.
    logging.getLogger("uvicorn").setLevel(noisy)
    logging.getLogger("httpx").setLevel(noisy)  # a line per request of the DICOMweb dispatch
    logging.getLogger("python_multipart").setLevel(
        logging.DEBUG if level == "debug" else logging.ERROR
    )
