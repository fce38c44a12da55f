"""What one rank did during one step, as timed spans: the raw material of the pipeline chart.

Every training step records its spans (forward and backward per micro-batch, the waits for a
neighbour's message, the gradient synchronisation and the optimizer step); recording is a pair
of clock reads and an append, so it is always on. The receive spans are timed with the very
clock reads that make the step's measured bubble (`wait_s`): the chart and the number agree.
Standard library only: parallel/ records into it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

KINDS = ("data", "forward", "backward", "recv", "send", "sync", "optimizer")
"""Span kinds: reading a micro-batch (data), compute (forward, backward), waits on neighbours
(recv: blocked in a receive; send: waiting at the end of the step until the neighbours took this
stage's messages), and the step's tail (sync: gradient all-reduce or reduce-scatter, tied
gradient, unscale and overflow check; optimizer: norm, clipping, the step)."""


@dataclass
class Span:
    kind: str
    """One of KINDS."""
    micro: int
    """Micro-batch index, or -1 for step-wide spans (sync, optimizer, send)."""
    start: float
    """Seconds since the step began on this rank."""
    end: float


@dataclass
class StepSpans:
    """The spans of one step on one rank, and when the step began on the wall clock (to line up
    ranks on a chart; on one host they share the clock)."""
    wall_start: float = field(default_factory=time.time)
    origin: float = field(default_factory=time.perf_counter)
    spans: list[Span] = field(default_factory=list)
    label: bool = False
    """Also mark each span for torch.profiler (only in profiled steps: free otherwise)."""

    def begin(self) -> float:
        """The step begins now (its spans are timed from here); returns the perf_counter origin."""
        self.wall_start, self.origin = time.time(), time.perf_counter()
        return self.origin

    def add(self, kind: str, micro: int, start: float, end: float) -> None:
        """Record a span from two perf_counter readings."""
        self.spans.append(Span(kind, micro, start - self.origin, end - self.origin))

    @contextlib.contextmanager
    def span(self, kind: str, micro: int = -1) -> Iterator[None]:
        """Time the block as one span."""
        marker = _profiler_label(kind, micro) if self.label else contextlib.nullcontext()
        start = time.perf_counter()
        with marker:
            yield
        self.add(kind, micro, start, time.perf_counter())

    def total(self, kind: str) -> float:
        return sum(s.end - s.start for s in self.spans if s.kind == kind)

    def as_dict(self, rank: int, stage: int, replica: int, step_s: float) -> dict:
        return {"rank": rank, "stage": stage, "replica": replica, "wall_start": self.wall_start,
                "step_s": step_s, "spans": [asdict(s) for s in self.spans]}


def _profiler_label(kind: str, micro: int) -> contextlib.AbstractContextManager:
    """A torch.profiler range named after the span (imported only when a step is profiled)."""
    from torch.profiler import record_function

    return record_function(f"hvdllm.{kind}" + (f" {micro}" if micro >= 0 else ""))
