"""Decide when a study has finished arriving, and queue its analysis: one home for "done".

- `rules`: the rules (the modality's MPPS, the images' own evidence, the quiet window)
  and the closing of a version with its reason.
- `evidence`: what a series' images declare about how many of them there are.
- `versions`: closing a version and queuing its jobs in the database.
- `timers`: the per-study timers (APScheduler) that ask `decide` when it may have changed
  its mind, and the sweep that covers for timers a restart lost.
"""

from daemon.assemble.rules import Waits, decide
from daemon.assemble.timers import Assembler
from daemon.assemble.versions import queue_version

__all__ = ["Assembler", "Waits", "decide", "queue_version"]
