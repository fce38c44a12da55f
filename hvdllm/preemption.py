"""Stopping early on request: Slurm's warning signal before the time limit, or scancel --signal.

A signal only sets a flag. At the end of every step the ranks agree (MAX over the world) whether
any of them received one, so all of them stop after the same step, write the same checkpoint and
exit with PREEMPTED_EXIT; the launch script then requeues the job, which resumes from it.
"""

from __future__ import annotations

import signal

PREEMPTED_EXIT = 75
"""Exit status of a run stopped by a signal after writing its checkpoint (EX_TEMPFAIL)."""

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Raised on every rank after the preemption checkpoint is written."""

    def __init__(self, step: int, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; "
                         f"checkpoint written, resume with --resume")
        self.step = step


class StopRequest:
    """Remembers the first stop signal this process receives."""

    def __init__(self) -> None:
        self.signum = 0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.signum = self.signum or signum

    def honoured(self) -> None:
        """The stop is done (checkpoint written): ignore the launch script's repeats from now on.

        The interpreter's exit puts the default action back for signals with a Python handler,
        and a repeat (every 5 s until the ranks are gone) would kill the rank while it exits
        (status 138 instead of 75). SIG_IGN is left as it is."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
