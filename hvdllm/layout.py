"""Layout arithmetic, in one place: world -> stages x replicas -> micro-batches per step.

Pure functions of numbers (no MPI, no torch), used by `hvdllm train`, config validation,
`hvdllm slurm` and `hvdllm bench`, so that every command agrees on whether a job fits a world.

    world          = stages (P) x replicas (R)
    global batch   = micro_batch_size x micro_batches (m) x replicas

A job sets the global batch and at least one of micro_batch_size and micro_batches (0 means
"derive it"); when it sets both, they must multiply out for the world it runs on. Nothing is
silently replaced: a job runs as written or is refused with one line saying why.

Rank r sits at stage r % P of replica r // P, so a replica's stages are neighbouring ranks and a
node holds whole pipelines where it can.
"""

from __future__ import annotations

from dataclasses import dataclass

from hvdllm.errors import UserError


class LayoutError(UserError):
    """A job that cannot run on the given world; the message is one line for the user."""


@dataclass(frozen=True)
class Layout:
    world: int
    stages: int
    """Pipeline stages P."""
    replicas: int
    """Data-parallel replicas R = world / P."""
    micro_batches: int
    """Micro-batches per replica per step: gradient accumulation, or the pipeline's m."""
    micro_batch_size: int
    """Sequences in one micro-batch."""

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.micro_batches * self.replicas

    def position(self, rank: int) -> tuple[int, int]:
        """(stage, replica) of a world rank."""
        return rank % self.stages, rank // self.stages

    def stage_ranks(self, stage: int) -> list[int]:
        """World ranks of one stage's replicas (its gradient all-reduce group)."""
        return list(range(stage, self.world, self.stages))

    def replica_ranks(self, replica: int) -> list[int]:
        """World ranks of one replica's stages, in stage order (its pipeline)."""
        return list(range(replica * self.stages, (replica + 1) * self.stages))

    def describe(self) -> str:
        rows = [" ".join(f"{r:>3}" for r in self.replica_ranks(rep)) for rep in range(self.replicas)]
        return (f"{self.world} rank(s) = {self.stages} stage(s) x {self.replicas} replica(s); "
                f"rank = replica x {self.stages} + stage; {self.micro_batches} micro-batch(es) x "
                f"{self.micro_batch_size} sequences x {self.replicas} replica(s) = global batch "
                f"{self.global_batch_size}:\n"
                + "\n".join(f"  replica {r}: ranks {row}" for r, row in enumerate(rows)))


def check_batch_settings(global_batch_size: int, micro_batch_size: int, micro_batches: int) -> None:
    """The world-independent part of the batch rule (config validation runs it)."""
    if global_batch_size < 1:
        raise LayoutError(f"training.global_batch_size ({global_batch_size}) must be > 0")
    if micro_batch_size < 0 or micro_batches < 0:
        raise LayoutError("training.micro_batch_size and parallel.micro_batches must be >= 0")
    if not micro_batch_size and not micro_batches:
        raise LayoutError("set training.micro_batch_size or parallel.micro_batches (both are 0)")
    fixed = max(micro_batch_size, 1) * max(micro_batches, 1)
    if global_batch_size % fixed:
        raise LayoutError(f"training.global_batch_size ({global_batch_size}) is not a multiple of "
                          f"{_what(micro_batch_size, micro_batches)}")


def plan(world: int, stages: int, global_batch_size: int, micro_batch_size: int,
         micro_batches: int) -> Layout:
    """The layout of a job on `world` ranks, or LayoutError saying why it does not fit."""
    if world < 1 or stages < 1:
        raise LayoutError(f"world size ({world}) and pipeline stages ({stages}) must be >= 1")
    if world % stages:
        raise LayoutError(f"world size {world} is not a multiple of parallel.pipeline_stages "
                          f"({stages}); launch a multiple of {stages} ranks")
    check_batch_settings(global_batch_size, micro_batch_size, micro_batches)
    replicas = world // stages
    per_replica, rest = divmod(global_batch_size, replicas)
    if rest:
        raise LayoutError(f"training.global_batch_size ({global_batch_size}) is not divisible by "
                          f"the {replicas} replicas ({world} ranks / {stages} stage(s))")
    mbs, m = micro_batch_size, micro_batches
    if mbs and m and mbs * m != per_replica:
        raise LayoutError(f"training.micro_batch_size ({mbs}) x parallel.micro_batches ({m}) x "
                          f"{replicas} replica(s) = {mbs * m * replicas}, not "
                          f"training.global_batch_size ({global_batch_size}); set one of the two "
                          f"to 0 to derive it")
    if not m:
        if per_replica % mbs:
            raise LayoutError(f"training.global_batch_size ({global_batch_size}) is not divisible "
                              f"by micro_batch_size x replicas ({mbs} x {replicas}); choose a "
                              f"multiple of {mbs * replicas}")
        m = per_replica // mbs
    if not mbs:
        if per_replica % m:
            raise LayoutError(f"training.global_batch_size ({global_batch_size}) is not divisible "
                              f"by parallel.micro_batches x replicas ({m} x {replicas}); choose a "
                              f"multiple of {m * replicas}")
        mbs = per_replica // m
    return Layout(world=world, stages=stages, replicas=replicas, micro_batches=m,
                  micro_batch_size=mbs)


def _what(micro_batch_size: int, micro_batches: int) -> str:
    parts = [f"training.micro_batch_size ({micro_batch_size})"] if micro_batch_size else []
    parts += [f"parallel.micro_batches ({micro_batches})"] if micro_batches else []
    return " x ".join(parts)


def job_layout(job, world: int) -> Layout:
    """plan() for a JobConfig (hvdllm.config) on `world` ranks."""
    return plan(world, job.parallel.pipeline_stages, job.training.global_batch_size,
                job.training.micro_batch_size, job.parallel.micro_batches)
