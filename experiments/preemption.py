"""Preemption: SIGTERM asks a training run to save a checkpoint and stop.

``with Preemption() as preemption:`` installs a SIGTERM handler for the block (the
previous one is restored after); ``preemption.requested(agree=...)`` says whether
the signal came. With several processes every process must stop at the same step,
so ``agree=True`` (called at the same steps on every process) combines the flags
of all processes with a host all-gather.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

EXIT_CODE = 128 + signal.SIGTERM  # what a process killed by SIGTERM would return


class Preempted(Exception):
    """The run saved a checkpoint at ``step`` after a SIGTERM; rerun it to continue."""

    def __init__(self, step: int, out: str):
        super().__init__(f"SIGTERM: saved step {step} in {out}; rerun the command to continue")
        self.step = step


class Preemption:
    def __init__(self):
        self.signalled = False
        self._previous = None

    def _handle(self, signum, frame):
        self.signalled = True

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def requested(self, *, agree: bool) -> bool:
        """Whether to stop now: this process's flag, or with ``agree`` and several
        processes, whether any process got the signal (a collective call)."""
        if jax.process_count() == 1:
            return self.signalled
        if not agree:
            return False
        flags = multihost_utils.process_allgather(np.array(self.signalled))
        return bool(np.any(flags))
