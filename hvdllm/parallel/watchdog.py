"""A watchdog for waits on other ranks: a peer that stops answering ends the job with a message.

Every blocking wait on another rank - a pipeline receive, a gradient all-reduce, a scalar
collective, a checkpoint barrier - runs inside `guard(what)`. If one lasts longer than the
timeout, the watchdog logs which rank waited for what in which step, and ends every rank (MPI
abort), instead of leaving the job hanging until the cluster's time limit.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

from hvdllm.log import logger


class Watchdog:
    def __init__(self, timeout_s: float, where: str, abort: Callable[[int], None],
                 reaction: str = "ending the job") -> None:
        self.timeout_s, self.where, self.abort, self.reaction = timeout_s, where, abort, reaction
        self.step = 0
        """The step being trained (set by the training loop, for the message)."""
        self._deadline: float | None = None
        self._what = ""
        self._wake = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="hvdllm-watchdog").start()

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        if self._deadline is not None:  # nested: the outer guard already watches
            yield
            return
        self._what, self._deadline = what, time.monotonic() + self.timeout_s
        self._wake.set()
        try:
            yield
        finally:
            self._deadline = None

    def _run(self) -> None:
        while True:
            deadline = self._deadline
            if deadline is None:
                self._wake.wait()
                self._wake.clear()
            elif time.monotonic() > deadline:
                logger.error("%s waited %.0f s for %s in step %d; %s", self.where,
                             self.timeout_s, self._what, self.step + 1, self.reaction)
                self.abort(1)
            else:
                time.sleep(min(1.0, max(0.01, deadline - time.monotonic())))
