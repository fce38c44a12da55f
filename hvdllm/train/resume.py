"""Writing checkpoints from every stage, and resuming from the newest one every rank can read.

Saving: rank 0 opens the checkpoint, each stage's first replica writes its shards and reports
their checksums, rank 0 writes the rest and commits (checkpoint/manager.py owns the files).

Resuming: rank 0 lists the candidates (newest first) and tells every rank; each rank reads and
verifies only the shards holding its stage's names; the world agrees (MAX) whether any rank
failed. A checkpoint some rank cannot use is skipped with one line saying why, and the next
older one is tried, so a save cut short or a damaged file loses at most one checkpoint's steps.
A checkpoint named explicitly (`--resume PATH`) is never swapped for another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import horovod.torch as hvd

from hvdllm.checkpoint import (
    Checkpoint,
    CheckpointError,
    resume_candidates,
    select_state,
    tied_aliases,
)
from hvdllm.checkpoint.shards import shard_name
from hvdllm.checkpoint.state import merge_optimizer_shards
from hvdllm.config import JobConfig, dump_toml
from hvdllm.data import PreparedData
from hvdllm.errors import UserError
from hvdllm.log import logger
from hvdllm.models import Stage
from hvdllm.parallel.data_parallel import barrier
from hvdllm.parallel.topology import Topology


@dataclass
class StageState:
    """What one rank read from a checkpoint: its stage's tensors, optimizer state and counters."""
    checkpoint: Checkpoint
    model: dict
    optim: dict
    train: dict


def read_stage_state(ckpt: Checkpoint, data: PreparedData, stage: Stage) -> StageState:
    """This stage's part of a checkpoint of any layout, verified shard by shard."""
    if ckpt.meta.get("tokenizer_fingerprint") != data.meta["tokenizer_fingerprint"]:
        raise UserError(f"{ckpt.path} was trained with a different tokenizer than {data.dir}")
    aliases = tied_aliases(stage.tied)
    wanted = list(stage.model.state_dict())
    merged = ckpt.load_named("model", wanted, aliases)
    model = select_state(merged, wanted, aliases)
    names = [n for n, _ in stage.model.named_parameters()]
    optim = merge_optimizer_shards(ckpt.load_shards("optim", names, aliases))
    return StageState(ckpt, model, optim, ckpt.load_train_state())


def restore(job: JobConfig, resume: str | None, topo: Topology, data: PreparedData, stage: Stage,
            sync) -> tuple[int, dict]:
    """Load the checkpoint `resume` names into this stage; returns (next step, counters)."""
    candidates, explicit = topo.rank0_decides(
        "which checkpoint to resume", lambda: resume_candidates(job.run_dir, resume))
    for path in candidates:
        state, error = None, ""
        try:
            state = read_stage_state(Checkpoint(path), data, stage)
        except CheckpointError as e:
            error = str(e)
        if not topo.world_max(1.0 if error else 0.0):  # every rank read its part
            return apply(state, stage, sync)
        if error:
            logger.warning("skipping checkpoint %s: %s", path, error)
        if explicit:
            raise CheckpointError(error or f"another rank could not read its part of {path}")
    if candidates:
        raise CheckpointError(f"no usable checkpoint in {job.run_dir / 'checkpoints'} "
                              f"({len(candidates)} skipped, reasons above)")
    return 0, {}


def restore_locally(job: JobConfig, resume: str, data: PreparedData, stage: Stage,
                    sync) -> tuple[int, dict]:
    """`restore` without a collective (elastic mode's start): the newest checkpoint this rank can
    read. Rank 0's choice is the world's: the elastic sync broadcasts its state."""
    candidates, explicit = resume_candidates(job.run_dir, resume)
    for path in candidates:
        try:
            return apply(read_stage_state(Checkpoint(path), data, stage), stage, sync)
        except CheckpointError as e:
            if explicit:
                raise
            logger.warning("skipping checkpoint %s: %s", path, e)
    if candidates:
        raise CheckpointError(f"no usable checkpoint in {job.run_dir / 'checkpoints'}")
    return 0, {}


def apply(state: StageState, stage: Stage, sync) -> tuple[int, dict]:
    """Put what was read into the stage and its gradient sync (parallel/grad_sync.py)."""
    stage.model.load_state_dict(state.model)
    sync.load_optimizer_state(state.optim, tied_aliases(stage.tied))
    meta = state.checkpoint.meta
    logger.info("resumed from %s (step %d, written by %d stage(s) x %d replica(s))",
                state.checkpoint.path, meta["step"], meta["stages"], meta["replicas"])
    return int(meta["step"]), state.train


def save_checkpoint(t, step: int) -> Path | None:
    """Each stage's first replica writes its shards; rank 0 writes the rest and commits.

    `t` is the Trainer (hvdllm.train.trainer). Returns the checkpoint's path on rank 0.
    """
    topo, manager = t.topo, t.checkpoints
    if topo.rank == 0:
        manager.begin(step)
    with topo.waiting("the checkpoint barrier"):
        barrier()
    shards = {shard_name("model", topo.stage): t.model.state_dict()} if topo.replica == 0 else {}
    shards.update(t.sync.optimizer_shards(topo.stage, topo.replica))  # ZeRO-1: every replica
    entries = manager.write_shards(step, shards)
    # Distributed: every shard's checksum reaches rank 0 (also the barrier after writing).
    with topo.waiting("the other stages' checkpoint shards"):
        gathered = hvd.allgather_object(entries, name="checkpoint_entries")
    path = None
    if topo.rank == 0:
        meta = {"step": step, "stages": topo.stages, "replicas": topo.replicas,
                "zero": t.job.parallel.zero,
                "tokenizer_fingerprint": t.data.meta["tokenizer_fingerprint"],
                "model_config": t.model.config.to_dict()}
        path = manager.commit(step, meta, {k: v for e in gathered for k, v in e.items()},
                              {"scaler": t.scaler.state_dict(), "skipped_steps": t.skipped_steps},
                              dump_toml(t.job), t.data.tokenizer_dir, t.job.training.keep_checkpoints)
        logger.info("checkpoint %s", path)
    with topo.waiting("rank 0 to finish the checkpoint"):
        barrier()
    return path
