"""A spawned child notices when the process that started it is gone, even by SIGKILL.

`serve`'s worker and receiver processes outlive a parent that was killed with `kill -9`
(nothing runs in it to stop them): they would keep claiming jobs, or holding the port, with
no one to stop them. Each watches its parent's sentinel instead and stops itself.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
from collections.abc import Callable
from multiprocessing.connection import wait

from daemon.logsetup import kv

log = logging.getLogger(__name__)


def watch_parent(on_gone: Callable[[], None]) -> threading.Thread | None:
    """Call `on_gone` from a thread once the parent process has ended; None outside a child."""
    parent = mp.parent_process()
    if parent is None or parent.sentinel is None:
        return None
    sentinel = parent.sentinel

    def watch() -> None:
        wait([sentinel])
        log.warning("parent process gone; stopping", extra=kv(parent=parent.pid))
        on_gone()

    thread = threading.Thread(target=watch, name="lifeline", daemon=True)
    thread.start()
    return thread
