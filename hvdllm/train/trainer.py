"""Setting up a rank: the grid, the run directory, data, its model stage, optimizer and resume."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import horovod.torch as hvd
import torch

from hvdllm.checkpoint import CheckpointManager
from hvdllm.config import JobConfig
from hvdllm.data import PreparedData, TokenReader, load_prepared, prepare
from hvdllm.errors import UserError
from hvdllm.layout import job_layout
from hvdllm.log import logger, setup_logging
from hvdllm.metrics import mfu_peak
from hvdllm.models import (
    Stage,
    count_parameters,
    empty_model,
    fill_weights,
    flops_per_token,
    model_config,
    partition_for,
)
from hvdllm.models.activations import checkpointed_blocks
from hvdllm.optim import LRSchedule, build_optimizer, optimizer_for, scaled_peak_lr
from hvdllm.parallel.compression import needs_overflow_check
from hvdllm.parallel.data_parallel import broadcast_parameters
from hvdllm.parallel.grad_sync import AllReduceSync
from hvdllm.parallel.pipeline import PipelineRunner, PointToPoint
from hvdllm.parallel.topology import Topology, init_distributed
from hvdllm.parallel.zero import ZeroSync
from hvdllm.precision import LossScaler, autocast
from hvdllm.profile.tracing import enable_horovod_timeline
from hvdllm.train.resume import restore
from hvdllm.train.run_dir import claim_run_dir


@dataclass
class Trainer:
    """Everything a step needs, built once by `setup`."""
    job: JobConfig
    topo: Topology
    device: torch.device
    data: PreparedData
    reader: TokenReader
    stage: Stage
    sync: AllReduceSync | ZeroSync
    """Gradient synchronisation over the stage's replicas (and the optimizer it steps)."""
    schedule: LRSchedule
    scaler: LossScaler
    runner: PipelineRunner
    checkpoints: CheckpointManager
    start_step: int = 0
    flops_per_token: float = 0.0
    peak_tflops: float = 0.0
    skipped_steps: int = 0
    """Steps skipped because a gradient overflowed (fp16)."""
    horovod_timeline: bool = False
    """Horovod can start its timeline (parallel.horovod_timeline, set up before hvd.init)."""
    val_batches: list = field(default_factory=list)
    """This replica's validation windows (cut at the first evaluation)."""

    @property
    def model(self) -> torch.nn.Module:
        return self.stage.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.sync.optimizer

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.sync.params


def pick_device(topo: Topology, threads: int) -> torch.device:
    """One GPU per local rank when there are GPUs; otherwise the cores split between local ranks.
    More ranks than GPUs on a node is refused: two ranks on one GPU is what NCCL refuses (or
    hangs on), and silently sharing would halve each rank's memory."""
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if topo.local_size > gpus:
            raise UserError(f"{topo.local_size} ranks on this node but {gpus} GPU(s): start at "
                            f"most {gpus} rank(s) per node, or hide the GPUs "
                            "(CUDA_VISIBLE_DEVICES=) to train on the CPU")
        torch.cuda.set_device(topo.local_rank)
        return torch.device("cuda", torch.cuda.current_device())
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // topo.local_size))
    return torch.device("cpu")


def prepared_data(job: JobConfig, topo: Topology) -> PreparedData:
    """Rank 0 prepares the tokens when they are missing; the others wait, then open them."""
    error = ""
    if topo.rank == 0 and not (job.data_dir / "meta.json").is_file():
        try:
            prepare(job)
        except Exception as e:  # reported on every rank below, not left to hang the others
            error = str(e)
    # Also a barrier; not under the watchdog: preparing a large corpus may take long.
    error = hvd.broadcast_object(error, root_rank=0, name="prepare_error")
    if error:
        raise UserError(error)
    return load_prepared(job)


def build_stage(job: JobConfig, topo: Topology, vocab_size: int) -> tuple[Stage, float]:
    """This rank's stage of the model (the whole model with one stage) and FLOPs per token.

    The model is built on the meta device and cut to the stage before any memory is taken, so
    a rank never allocates a parameter it does not own; its weights come from (seed, name).
    """
    model = empty_model(model_config(job.model, vocab_size, job.data.seq_len))
    fpt = flops_per_token(model, job.data.seq_len)
    layers = partition_for(model, topo.stages, job.parallel.stage_layers or None)
    if topo.rank == 0 and topo.stages > 1:
        logger.info("stages: %s", ", ".join(f"{s}: blocks {r.start}-{r.stop - 1}"
                                            for s, r in enumerate(layers)))
    stage = Stage(model, layers[topo.stage], topo.is_first_stage, topo.is_last_stage)
    stage.checkpointed = checkpointed_blocks(job.training.activation_checkpointing,
                                             job.training.checkpoint_every_blocks, job.model.n_layer)
    fill_weights(stage.model, job.model, job.run.seed)
    return stage, fpt


def gradient_sync(job: JobConfig, topo: Topology, stage: Stage,
                  peak_lr: float) -> AllReduceSync | ZeroSync:
    """Plain data parallelism (Horovod's all-reduce), or ZeRO-1 with parallel.zero = 1."""
    model = stage.model
    if job.parallel.zero:
        return ZeroSync(list(model.named_parameters()),
                        lambda decay, no_decay: optimizer_for(decay, no_decay, job.optim, peak_lr),
                        job.parallel.compression, topo.process_set, topo.replicas, topo.replica,
                        topo.stage, topo.layout.micro_batches, topo.replica_sum,
                        tied=stage.tied_weight)
    return AllReduceSync(build_optimizer(model, job.optim, peak_lr), model,
                         job.parallel.compression, topo.layout.micro_batches, topo.process_set,
                         topo.replicas)


def setup(job: JobConfig, resume: str | None, fresh: bool = False) -> Trainer:
    timeline = enable_horovod_timeline(job.parallel.horovod_timeline)  # before hvd.init
    topo = init_distributed(lambda world: job_layout(job, world), job.parallel.peer_timeout_s)
    setup_logging(topo.rank)
    device = pick_device(topo, job.training.threads)
    logger.info("%s", topo.describe())
    # Rank 0 decides whether this run may use the run directory, before anything is written.
    note = topo.rank0_decides("the run directory", lambda: claim_run_dir(job.run_dir, resume, fresh))
    if note:
        logger.info("%s", note)
    t = build_trainer(job, topo, device, prepared_data(job, topo), timeline)
    t.start_step, saved = restore(job, resume, topo, t.data, t.stage, t.sync)
    adopt_counters(t, saved)
    # Distributed step 2: every replica starts from its stage's first replica's weights. Every
    # rank read the same checkpoint, so optimizer state needs no broadcast; a fresh optimizer has
    # none (Horovod's broadcast_optimizer_state would create it with a zero-gradient step, which
    # moves AdamW's weights and step count).
    with topo.waiting("the initial weights of the stage's first replica"):
        broadcast_parameters(t.model, root_rank=topo.stage, process_set=topo.process_set)
    return t


def build_trainer(job: JobConfig, topo: Topology, device: torch.device, data: PreparedData,
                  timeline: bool = False) -> Trainer:
    """This rank's model stage, gradient sync, scaler and schedule runner: no collective."""
    reader = TokenReader(data.tokens("train"), job.data.seq_len, job.training.global_batch_size,
                         job.run.seed)
    stage, fpt = build_stage(job, topo, data.meta["vocab_size"])
    stage.model.to(device)
    peak_lr = scaled_peak_lr(job.optim, topo.replicas)
    # Distributed step 1: the stage's gradients are averaged across its replicas (grad_sync).
    sync = gradient_sync(job, topo, stage, peak_lr)
    # fp16 (loss scaling) and fp16 compression (an fp16 sum can overflow) both need the
    # world-agreed inf/NaN check; fp16 compression alone keeps the scale at 1. bf16 compression
    # cannot overflow: no check.
    scaler = LossScaler(job.precision.dtype == "fp16", job.precision.initial_scale,
                        job.precision.growth_interval, world_max=topo.world_max,
                        check_overflow=needs_overflow_check(job.parallel.compression))
    peak, source = (job.precision.peak_tflops, "from the job") if job.precision.peak_tflops \
        else mfu_peak(job.precision.dtype, device)
    logger.info("model: %s %.2fM parameters on this stage | MFU peak %.2f TFLOP/s per rank (%s)",
                job.model.family, count_parameters(stage.model) / 1e6, peak, source)
    return Trainer(job=job, topo=topo, device=device, data=data, reader=reader, stage=stage,
                   sync=sync, schedule=LRSchedule(job.optim, peak_lr, job.training.steps),
                   scaler=scaler, runner=schedule_runner(job, topo, stage, scaler, device),
                   checkpoints=CheckpointManager(job.run_dir), flops_per_token=fpt,
                   peak_tflops=peak, horovod_timeline=timeline)


def schedule_runner(job: JobConfig, topo: Topology, stage: Stage, scaler: LossScaler,
                    device: torch.device) -> PipelineRunner:
    """The stage's schedule over its micro-batches (pipeline messages by mpi4py when P > 1)."""
    p2p = PointToPoint(topo.pipe_comm, topo.waiting, device) if topo.stages > 1 else None
    return PipelineRunner(stage, topo.stage, topo.stages, job.parallel.schedule,
                          topo.layout.micro_batches, p2p, device,
                          lambda: autocast(job.precision.dtype, device), scaler.scale_loss)


def adopt_counters(t: Trainer, saved: dict) -> None:
    """The loss scale and skipped-step count a checkpoint saved (nothing for a fresh run)."""
    if saved:
        t.scaler.load_state_dict(saved["scaler"])
    t.skipped_steps = int(saved.get("skipped_steps", 0))
