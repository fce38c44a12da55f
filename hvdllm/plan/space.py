"""The layouts a planner may choose from: every valid combination of the layout knobs.

A Candidate is one point: pipeline stages (cut balanced) x replicas, micro-batches x micro-batch size (the job's
global batch is kept), pipeline schedule, ZeRO-1, activation checkpointing and gradient
compression. Its `sets()` are the `--set` overrides that run it, and every candidate enumerated
here passes hvdllm.layout.plan and the job's own validation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

from hvdllm.config import JobConfig
from hvdllm.layout import LayoutError, plan


@dataclass(frozen=True)
class Candidate:
    stages: int
    replicas: int
    micro_batches: int
    micro_batch_size: int
    schedule: str = "1f1b"
    zero: int = 0
    checkpointing: str = "none"
    compression: str = "none"

    @property
    def world(self) -> int:
        return self.stages * self.replicas

    def sets(self) -> list[str]:
        """The `--set` overrides that run this layout (stages cut balanced, as a run cuts them
        without parallel.stage_layers)."""
        return [f"parallel.pipeline_stages={self.stages}", "parallel.stage_layers=[]",
                f"parallel.micro_batches={self.micro_batches}",
                f"training.micro_batch_size={self.micro_batch_size}",
                f"parallel.schedule={self.schedule}", f"parallel.zero={self.zero}",
                f"training.activation_checkpointing={self.checkpointing}",
                f"parallel.compression={self.compression}"]

    def apply(self, job: JobConfig) -> JobConfig:
        """A copy of the job that runs this layout."""
        out = copy.deepcopy(job)
        out.parallel.pipeline_stages, out.parallel.micro_batches = self.stages, self.micro_batches
        out.parallel.stage_layers = []
        out.training.micro_batch_size = self.micro_batch_size
        out.parallel.schedule, out.parallel.zero = self.schedule, self.zero
        out.training.activation_checkpointing = self.checkpointing
        out.parallel.compression = self.compression
        return out

    def label(self) -> str:
        """Short and readable: 'P2 x R4, 8 x 2 seq, 1f1b, ZeRO-1, ckpt, fp16'."""
        parts = [f"P{self.stages} x R{self.replicas}",
                 f"{self.micro_batches} x {self.micro_batch_size} seq"]
        parts += [self.schedule] if self.stages > 1 else []
        parts += ["ZeRO-1"] if self.zero else []
        parts += ["ckpt"] if self.checkpointing != "none" else []
        parts += ["fp16 grads"] if self.compression != "none" else []
        return ", ".join(parts)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(job: JobConfig, world: int, max_micro_batch_size: int = 64) -> Iterator[Candidate]:
    """Every layout of the job on `world` ranks (global batch kept), knobs varied independently;
    schedules only matter with stages, ZeRO-1 and compression only with replicas."""
    n_layer = job.model.n_layer
    for stages in divisors(world):
        if stages > n_layer:
            continue
        replicas = world // stages
        if job.training.global_batch_size % replicas:
            continue
        per_replica = job.training.global_batch_size // replicas
        for mbs in divisors(per_replica):
            if mbs > max_micro_batch_size:
                continue
            try:
                plan(world, stages, job.training.global_batch_size, mbs, per_replica // mbs)
            except LayoutError:
                continue
            yield from _knobs(stages, replicas, per_replica // mbs, mbs)


def _knobs(stages: int, replicas: int, m: int, mbs: int) -> Iterator[Candidate]:
    for schedule in (("1f1b", "gpipe") if stages > 1 else ("1f1b",)):
        for zero in ((0, 1) if replicas > 1 else (0,)):
            # fp16 compression goes with ZeRO-1 too: its reduce-scatter compresses the same way.
            for compression in (("none", "fp16") if replicas > 1 else ("none",)):
                for ckpt in ("none", "blocks"):
                    yield Candidate(stages, replicas, m, mbs, schedule, zero, ckpt, compression)


def current(job: JobConfig, world: int) -> Candidate:
    """The job's own layout on `world` ranks, as a Candidate (LayoutError if it does not fit)."""
    from hvdllm.layout import job_layout

    lay = job_layout(job, world)
    return Candidate(lay.stages, lay.replicas, lay.micro_batches, lay.micro_batch_size,
                     job.parallel.schedule, job.parallel.zero,
                     job.training.activation_checkpointing, job.parallel.compression)
