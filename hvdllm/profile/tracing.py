"""Traces of chosen steps: torch.profiler per rank and Horovod's own timeline.

    training.profile = true            -> run_dir/profile/rank{R}.steps{A}-{B}.pt.trace.json
                                          (+ .txt: the operators that took the most time)
    parallel.horovod_timeline = true   -> run_dir/profile/horovod_timeline.steps{A}-{B}.json

Both cover steps A..B (training.profile_start_step and training.profile_steps, numbered from 1
like the logs). The traces open in Perfetto (ui.perfetto.dev), chrome://tracing or TensorBoard's
PyTorch profiler plugin; the timeline in Perfetto or chrome://tracing. With both off no Tracer
exists: the loop holds None, no profiler object is made and no span is labelled.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from hvdllm.log import logger

TIMELINE_ENV = "HOROVOD_TIMELINE"


def enable_horovod_timeline(wanted: bool) -> bool:
    """Before hvd.init: Horovod starts a timeline later only if HOROVOD_TIMELINE=DYNAMIC was set
    at init. Returns whether the job's timeline can be used (False when the user set the
    variable to a file: Horovod then writes its own whole-run timeline there)."""
    if not wanted:
        return False
    current = os.environ.get(TIMELINE_ENV)
    if current and current != "DYNAMIC":
        logger.warning("%s=%s is set: Horovod writes a whole-run timeline there; "
                       "parallel.horovod_timeline is not used", TIMELINE_ENV, current)
        return False
    os.environ[TIMELINE_ENV] = "DYNAMIC"
    return True


class Tracer:
    """Starts the profiler and the timeline before step `first` and writes them after `last`."""

    def __init__(self, out: Path, rank: int, first: int, last: int, torch_profile: bool,
                 timeline: bool, cuda: bool) -> None:
        self.out, self.rank, self.first, self.last = out, rank, first, last
        self.torch_profile, self.timeline, self.cuda = torch_profile, timeline, cuda
        self.profiler: torch.profiler.profile | None = None
        self.recording = False

    @property
    def trace_path(self) -> Path:
        return self.out / f"rank{self.rank}.steps{self.first}-{self.last}.pt.trace.json"

    @property
    def timeline_path(self) -> Path:
        return self.out / f"horovod_timeline.steps{self.first}-{self.last}.json"

    def before_step(self, number: int) -> None:
        """Called before the step that will be logged as `number`."""
        if number != self.first:
            return
        import horovod.torch as hvd

        self.out.mkdir(parents=True, exist_ok=True)
        if self.timeline:  # every rank calls it; Horovod's coordinator (rank 0) writes the file
            hvd.start_timeline(str(self.timeline_path.resolve()), mark_cycles=False)
        if self.torch_profile:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with warnings.catch_warnings():  # no warm-up steps: the loop's first steps were
                warnings.simplefilter("ignore")
                steps = torch.profiler.schedule(wait=0, warmup=0, active=self.last - self.first + 1,
                                                repeat=1)
            self.profiler = torch.profiler.profile(
                activities=activities, schedule=steps, record_shapes=True, profile_memory=True,
                on_trace_ready=self._write)
            self.profiler.start()
        self.recording = True

    def _write(self, prof: torch.profiler.profile) -> None:
        """The trace, and beside it the operators that took the most time (a table to read on
        a cluster's login node, where no trace viewer runs)."""
        prof.export_chrome_trace(str(self.trace_path))
        sort_by = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=25)
        self.trace_path.with_name(self.trace_path.name.replace(".pt.trace.json", ".txt")).write_text(
            f"steps {self.first}-{self.last}, rank {self.rank}: operators by {sort_by}\n{table}\n")

    def after_step(self, number: int) -> None:
        """Called after step `number`: closes its ProfilerStep#K range (K counts the profiled
        steps from 0); writes everything after the last."""
        if not self.recording:
            return
        if self.profiler is not None:
            self.profiler.step()  # a ProfilerStep#N range per step in the trace
        if number >= self.last:
            self.stop()

    def stop(self, timeline: bool = True) -> None:
        """Write what was recorded (also when the run ends early). After an error pass
        timeline=False: stop_timeline waits for Horovod's writer thread, gone if Horovod is."""
        if not self.recording:
            return
        self.recording = False
        if self.timeline and timeline:
            import horovod.torch as hvd

            hvd.stop_timeline()  # returns once Horovod's writer has closed the file
            if self.rank == 0:
                logger.info("Horovod timeline: %s", self.timeline_path)
        if self.profiler is not None:
            self.profiler.stop()  # the last step() already wrote the trace; an early stop writes it
            self.profiler = None
            if self.rank == 0:
                logger.info("profiler traces: %s (one per rank)", self.trace_path)


def make_tracer(run_dir: Path, rank: int, profile: bool, timeline: bool, start: int, count: int,
                resumed_at: int, total_steps: int, cuda: bool) -> Tracer | None:
    """The run's Tracer, or None when nothing is traced (both off, or the steps already ran)."""
    if not (profile or timeline):
        return None
    first, last = max(start, resumed_at + 1), min(start + count - 1, total_steps)
    if first > last:
        if rank == 0:
            logger.info("profiling: steps %d-%d were trained before this resume; nothing traced",
                        start, start + count - 1)
        return None
    return Tracer(run_dir / "profile", rank, first, last, profile, timeline, cuda)
