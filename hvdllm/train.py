"""`hvdllm train`: the training loop, run on every rank.

Read top to bottom: set up (Horovod, data, model, optimizer), then each step
    forward/backward over the micro-batches  -> Horovod all-reduces gradients during backward
    synchronize, unscale, agree on overflow  -> every rank takes the same decision
    gradient norm, learning rate, clip, step
then log, evaluate and checkpoint on their schedules.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F

from hvdllm import checkpoint
from hvdllm.config import JobConfig, accumulation_steps, dump_toml
from hvdllm.data import PreparedData, TokenReader, load_prepared, prepare
from hvdllm.log import logger, setup_logging
from hvdllm.metrics import MetricsWriter, measure_peak_tflops
from hvdllm.model import build_model, count_parameters, flops_per_token
from hvdllm.optim import (LRSchedule, build_optimizer, clip_gradients, global_grad_norm,
                          scaled_peak_lr, set_lr)
from hvdllm.parallel.data_parallel import broadcast_state, distributed_optimizer
from hvdllm.parallel.topology import Topology, init_distributed
from hvdllm.precision import LossScaler, autocast
from hvdllm.preemption import Preempted, StopRequest


@dataclass
class Trainer:
    """Everything a step needs, built once by `setup`."""
    job: JobConfig
    topo: Topology
    device: torch.device
    data: PreparedData
    reader: TokenReader
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: LossScaler
    accumulation: int
    start_step: int = 0
    flops_per_token: float = 0.0
    peak_tflops: float = 0.0
    params: list = field(default_factory=list)
    skipped_steps: int = 0
    """Steps skipped because a gradient overflowed (fp16)."""


def pick_device(topo: Topology, threads: int) -> torch.device:
    """One GPU per local rank when there are GPUs; otherwise the cores split between local ranks."""
    if torch.cuda.is_available():
        torch.cuda.set_device(topo.local_rank % torch.cuda.device_count())
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
    hvd.broadcast_object(error, root_rank=0, name="prepare_error")  # doubles as a barrier
    if error:
        raise ValueError(error)
    return load_prepared(job)


def setup(job: JobConfig, resume: str | None) -> Trainer:
    topo = init_distributed(job.parallel.pipeline_stages)
    setup_logging(topo.rank)
    if topo.stages > 1:
        raise NotImplementedError("pipeline stages are not available yet in this version")
    device = pick_device(topo, job.training.threads)
    logger.info("%s", topo.describe())
    data = prepared_data(job, topo)
    accumulation = accumulation_steps(job, topo.replicas)
    reader = TokenReader(data.tokens("train"), job.data.seq_len, job.training.global_batch_size,
                         job.run.seed)
    model = build_model(job.model, data.meta["vocab_size"], job.data.seq_len, job.run.seed).to(device)
    peak_lr = scaled_peak_lr(job.optim, topo.replicas)
    optimizer = build_optimizer(model, job.optim, peak_lr)

    # Distributed step 1: gradients are averaged across replicas by the wrapped optimizer.
    # Horovod builds a new optimizer from the param groups, so state is loaded after wrapping.
    optimizer = distributed_optimizer(optimizer, model, job.parallel.compression, accumulation,
                                      topo.process_set, topo.replicas)
    ckpt = checkpoint.resolve(job.run_dir, resume)
    start_step, saved = restore(ckpt, job, data, model, optimizer) if ckpt else (0, {})
    # Distributed step 2: every rank starts from rank 0's weights (and, when resuming, optimizer
    # state). A fresh optimizer has no state to send; Horovod would create it by taking a step
    # with zero gradients, which moves AdamW's weights (decay) and its step count, so we skip it.
    broadcast_state(model, optimizer, with_optimizer_state=ckpt is not None)
    scaler = LossScaler(job.precision.dtype == "fp16", job.precision.initial_scale,
                        job.precision.growth_interval, world_max=topo.world_max)
    if saved:
        scaler.load_state_dict(saved["scaler"])
    peak = job.precision.peak_tflops or measure_peak_tflops(job.precision.dtype, device)
    logger.info("model: %s %.2fM parameters | accumulation %d x micro-batch %d x %d replica(s) = "
                "global batch %d | MFU peak %.2f TFLOP/s per rank (%s)", job.model.family,
                count_parameters(model) / 1e6, accumulation, job.training.micro_batch_size,
                topo.replicas, job.training.global_batch_size, peak,
                "from the job" if job.precision.peak_tflops else f"measured {job.precision.dtype} matmul")
    return Trainer(job=job, topo=topo, device=device, data=data, reader=reader, model=model,
                   optimizer=optimizer, schedule=LRSchedule(job.optim, peak_lr, job.training.steps),
                   scaler=scaler, accumulation=accumulation, start_step=start_step,
                   flops_per_token=flops_per_token(model, job.data.seq_len), peak_tflops=peak,
                   params=[p for p in model.parameters() if p.requires_grad],
                   skipped_steps=int(saved.get("skipped_steps", 0)))


def restore(ckpt: Path, job: JobConfig, data: PreparedData, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Load a checkpoint written by this layout; returns (next step, the rest of its state)."""
    meta = checkpoint.read_meta(ckpt)
    if meta["tokenizer_fingerprint"] != data.meta["tokenizer_fingerprint"]:
        raise ValueError(f"{ckpt} was trained with a different tokenizer than {data.dir}")
    model.load_state_dict(checkpoint.load_file(ckpt, "model.pt"))
    state = checkpoint.load_file(ckpt, "train.pt")
    optimizer.load_state_dict(state["optimizer"])
    logger.info("resumed from %s (step %d)", ckpt, meta["step"])
    return int(meta["step"]), state


def loss_fn(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def forward_backward(t: Trainer, step: int) -> torch.Tensor:
    """Forward and backward over this replica's micro-batches; returns the mean loss (detached)."""
    job, topo = t.job, t.topo
    t.model.train()
    torch.manual_seed(job.run.seed * 100_003 + step * 1009 + topo.rank)  # dropout: exact on resume
    loss_sum = torch.zeros((), device=t.device)
    for micro in range(t.accumulation):
        inputs, targets = t.reader.micro_batch(step, topo.replica, micro,
                                               job.training.micro_batch_size, topo.replicas)
        with autocast(job.precision.dtype, t.device):
            loss = loss_fn(t.model, inputs.to(t.device), targets.to(t.device))
        # Horovod's hooks fire during the last micro-batch's backward: each gradient's ring
        # all-reduce starts as soon as that gradient is ready, overlapping the rest of backward.
        t.scaler.scale_loss(loss / t.accumulation).backward()
        loss_sum += loss.detach()
    return loss_sum / t.accumulation


def apply_gradients(t: Trainer, step: int) -> dict[str, float]:
    """Wait for the all-reduce, unscale, agree on overflow, pick the rate, clip and step."""
    # Distributed step 3: wait until every gradient is averaged over the replicas.
    t.optimizer.synchronize()
    # Distributed step 4: unscale and agree across the world whether any gradient overflowed.
    overflow = t.scaler.unscale_and_check(t.params)
    grad_norm = global_grad_norm(t.params)  # replicas hold identical, averaged gradients
    lr = t.schedule(step, grad_norm)
    set_lr(t.optimizer, lr)
    if overflow:
        t.skipped_steps += 1
    else:
        clip_gradients(t.params, grad_norm, t.job.training.grad_clip)
        with t.optimizer.skip_synchronize():  # already synchronized above
            t.optimizer.step()
    t.scaler.update(overflow)
    t.optimizer.zero_grad()
    return {"lr": lr, "grad_norm": grad_norm, "loss_scale": t.scaler.scale,
            "skipped_steps": t.skipped_steps}


def train_step(t: Trainer, step: int) -> dict[str, float]:
    """One optimizer step over the global batch; returns this rank's metrics."""
    loss = forward_backward(t, step)
    return {"loss": loss, **apply_gradients(t, step)}


@torch.no_grad()
def evaluate(t: Trainer) -> dict[str, float]:
    """Mean validation loss over fixed windows, averaged over replicas; perplexity = exp(loss)."""
    val = TokenReader(t.data.tokens("val"), t.job.data.seq_len, t.job.training.global_batch_size,
                      t.job.run.seed)
    t.model.eval()
    total, count = 0.0, 0
    for inputs, targets in val.eval_batches(t.job.training.eval_batches, t.topo.replica,
                                             t.topo.replicas, t.job.training.micro_batch_size):
        with autocast(t.job.precision.dtype, t.device):
            total += float(loss_fn(t.model, inputs.to(t.device), targets.to(t.device))) * len(inputs)
        count += len(inputs)
    # Distributed: sum of losses and of windows over replicas -> the mean over all windows.
    sums = hvd.allreduce(torch.tensor([total, float(count)], dtype=torch.float64), op=hvd.Sum,
                         name="eval", process_set=t.topo.process_set)
    loss = float(sums[0] / sums[1])
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def save_checkpoint(t: Trainer, step: int) -> None:
    """Rank 0 writes; the others wait so nobody races ahead of a checkpoint being written."""
    if t.topo.rank == 0:
        tmp = checkpoint.begin(t.job.run_dir, step)
        checkpoint.write_file(tmp, "model.pt", t.model.state_dict())
        checkpoint.write_file(tmp, "train.pt", {"optimizer": t.optimizer.state_dict(),
                                                 "scaler": t.scaler.state_dict(),
                                                 "skipped_steps": t.skipped_steps})
        meta = {"step": step, "stages": t.topo.stages, "replicas": t.topo.replicas,
                "tokenizer_fingerprint": t.data.meta["tokenizer_fingerprint"],
                "model_config": t.model.config.to_dict()}
        path = checkpoint.commit(tmp, meta, dump_toml(t.job), t.data.tokenizer_dir,
                                 t.job.training.keep_checkpoints)
        logger.info("checkpoint %s", path)
    hvd.broadcast_object(step, root_rank=0, name="checkpoint_barrier")


def due(done: int, every: int, total: int) -> bool:
    """Periodic work runs every `every` steps (if > 0) and always after the last step."""
    return done == total or (every > 0 and done % every == 0)


def train(job: JobConfig, resume: str | None = None) -> dict[str, float]:
    """Train on every rank; returns the last metrics (loss averaged over replicas, val loss)."""
    stop = StopRequest()  # before setup: a signal during start-up is honoured after step one
    t = setup(job, resume)
    writer = None
    if t.topo.rank == 0:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        (job.run_dir / "job.toml").write_text(dump_toml(job))
        writer = MetricsWriter(job.run_dir, dump_toml(job), job.training.steps, t.start_step)
    tokens_per_step = job.training.global_batch_size * job.data.seq_len
    every = job.training
    last: dict[str, float] = {}
    window_start, window_steps, run_start = time.perf_counter(), 0, time.perf_counter()
    for step in range(t.start_step, job.training.steps):
        stats = train_step(t, step)
        window_steps += 1
        done = step + 1  # steps completed: logs and checkpoints are numbered by it
        metrics: dict[str, float] = {}
        if due(done, every.log_every, every.steps):
            metrics = log_metrics(t, stats, time.perf_counter() - window_start, window_steps,
                                  tokens_per_step)
            window_start, window_steps = time.perf_counter(), 0
        if due(done, every.eval_every, every.steps):
            metrics.update(evaluate(t))
        if metrics:
            last.update(metrics)
            if writer:
                writer.log(done, metrics)
                if "loss" in metrics:
                    writer.console(done, last, time.perf_counter() - run_start, done - t.start_step)
        # Preemption: all ranks agree whether any was signalled, so they stop after the same step.
        signalled = int(t.topo.world_max(stop.signum)) if done < every.steps else 0
        if signalled or due(done, every.checkpoint_every, every.steps):
            save_checkpoint(t, done)
        if signalled:
            if writer:
                writer.close()
            raise Preempted(done, signalled)
    if writer:
        if "val_loss" in last:
            logger.info("done: val loss %.4f, val ppl %.2f", last["val_loss"], last["val_ppl"])
        writer.close()
    return last


def log_metrics(t: Trainer, stats: dict, elapsed: float, steps: int, tokens_per_step: int) -> dict:
    """Average the loss over replicas and turn step time into throughput and MFU."""
    loss = t.topo.replica_mean(float(stats["loss"]))
    tokens_per_s = tokens_per_step * steps / elapsed
    mfu = t.flops_per_token * tokens_per_s / (t.peak_tflops * 1e12 * t.topo.world)
    return {"loss": loss, "lr": stats["lr"], "grad_norm": stats["grad_norm"],
            "loss_scale": stats["loss_scale"], "skipped_steps": stats["skipped_steps"],
            "tokens_per_s": tokens_per_s, "mfu": mfu,
            "step_ms": 1000 * elapsed / steps}
