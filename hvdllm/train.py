"""`hvdllm train`: the training loop, run on every rank.

Read top to bottom: set up (Horovod and the rank grid, data, model stage, optimizer), then each
step
    forward/backward over the micro-batches   -> Horovod all-reduces gradients during backward;
                                                 pipeline stages pass activations by mpi4py
    synchronize, tie, unscale, agree overflow -> every rank takes the same decision
    gradient norm, learning rate, clip, step
then log, evaluate and checkpoint on their schedules. One process, data parallel and pipeline
layouts all run this same code; with one stage the pipeline is plain gradient accumulation.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import horovod
import horovod.torch as hvd
import torch

from hvdllm import checkpoint
from hvdllm.config import JobConfig, dump_toml
from hvdllm.data import PreparedData, TokenReader, load_prepared, prepare
from hvdllm.errors import UserError
from hvdllm.layout import job_layout
from hvdllm.log import logger, setup_logging
from hvdllm.metrics import MetricsWriter, measure_peak_tflops
from hvdllm.model import build_model, count_parameters, flops_per_token
from hvdllm.optim import LRSchedule, build_optimizer, clip_gradients, global_grad_norm, scaled_peak_lr, set_lr
from hvdllm.parallel.data_parallel import (
    barrier,
    broadcast_parameters,
    compression_for,
    distributed_optimizer,
)
from hvdllm.parallel.pipeline import PipelineRunner, PointToPoint, StepResult, sync_tied_gradient
from hvdllm.parallel.schedules import bubble_fraction
from hvdllm.parallel.stages import Stage, partition_for
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
    stage: Stage
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: LossScaler
    runner: PipelineRunner
    micro_batches: int
    """Micro-batches per replica per step (gradient accumulation, or the pipeline's m)."""
    micro_batch_size: int
    start_step: int = 0
    flops_per_token: float = 0.0
    peak_tflops: float = 0.0
    skipped_steps: int = 0
    """Steps skipped because a gradient overflowed (fp16)."""
    params: list = field(default_factory=list)
    val_batches: list = field(default_factory=list)
    """This replica's validation windows (cut at the first evaluation)."""

    @property
    def model(self) -> torch.nn.Module:
        return self.stage.model


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
    error = hvd.broadcast_object(error, root_rank=0, name="prepare_error")  # also a barrier
    if error:
        raise UserError(error)
    return load_prepared(job)


def build_stage(job: JobConfig, topo: Topology, vocab_size: int) -> tuple[Stage, float]:
    """This rank's stage of the model (the whole model with one stage) and FLOPs per token."""
    model = build_model(job.model, vocab_size, job.data.seq_len, job.run.seed)
    fpt = flops_per_token(model, job.data.seq_len)
    layers = partition_for(model, topo.stages, job.parallel.stage_layers or None)
    if topo.rank == 0 and topo.stages > 1:
        logger.info("stages: %s", ", ".join(f"{s}: blocks {r.start}-{r.stop - 1}"
                                            for s, r in enumerate(layers)))
    return Stage(model, layers[topo.stage], topo.is_first_stage, topo.is_last_stage), fpt


def setup(job: JobConfig, resume: str | None) -> Trainer:
    topo = init_distributed(lambda world: job_layout(job, world), job.parallel.peer_timeout_s)
    setup_logging(topo.rank)
    device = pick_device(topo, job.training.threads)
    logger.info("%s", topo.describe())
    data = prepared_data(job, topo)
    m, mbs = topo.layout.micro_batches, topo.layout.micro_batch_size
    reader = TokenReader(data.tokens("train"), job.data.seq_len, job.training.global_batch_size,
                         job.run.seed)
    stage, fpt = build_stage(job, topo, data.meta["vocab_size"])
    model = stage.model.to(device)
    peak_lr = scaled_peak_lr(job.optim, topo.replicas)
    # Distributed step 1: the stage's gradients are averaged across its replicas by the wrapped
    # optimizer. Horovod builds a new optimizer from the param groups: load state after wrapping.
    optimizer = distributed_optimizer(build_optimizer(model, job.optim, peak_lr), model,
                                      job.parallel.compression, m, topo.process_set, topo.replicas)
    ckpt = checkpoint.resolve(job.run_dir, resume)
    start_step, saved = restore(ckpt, data, model, optimizer) if ckpt else (0, {})
    # Distributed step 2: every replica starts from its stage's first replica's weights. Every
    # rank read the same checkpoint, so optimizer state needs no broadcast; a fresh optimizer has
    # none (Horovod's broadcast_optimizer_state would create it with a zero-gradient step, which
    # moves AdamW's weights and step count).
    with topo.waiting("the initial weights of the stage's first replica"):
        broadcast_parameters(model, root_rank=topo.stage, process_set=topo.process_set)
    # fp16 (loss scaling) and fp16 compression (an fp16 sum can overflow) both need the
    # world-agreed inf/NaN check; fp16 compression alone keeps the scale at 1.
    scaler = LossScaler(job.precision.dtype == "fp16", job.precision.initial_scale,
                        job.precision.growth_interval, world_max=topo.world_max,
                        check_overflow=job.parallel.compression == "fp16")
    if saved:
        scaler.load_state_dict(saved["scaler"])
    p2p = PointToPoint(topo.pipe_comm, topo.waiting) if topo.stages > 1 else None
    runner = PipelineRunner(stage, topo.stage, topo.stages, job.parallel.schedule, m, p2p, device,
                            lambda: autocast(job.precision.dtype, device), scaler.scale_loss)
    peak = job.precision.peak_tflops or measure_peak_tflops(job.precision.dtype, device)
    logger.info("model: %s %.2fM parameters on this stage | %d micro-batch(es) x %d sequences x "
                "%d replica(s) = global batch %d | MFU peak %.2f TFLOP/s per rank (%s)",
                job.model.family, count_parameters(model) / 1e6, m, mbs, topo.replicas,
                job.training.global_batch_size, peak,
                "from the job" if job.precision.peak_tflops else f"measured {job.precision.dtype} matmul")
    return Trainer(job=job, topo=topo, device=device, data=data, reader=reader, stage=stage,
                   optimizer=optimizer, schedule=LRSchedule(job.optim, peak_lr, job.training.steps),
                   scaler=scaler, runner=runner, micro_batches=m, micro_batch_size=mbs,
                   start_step=start_step, flops_per_token=fpt, peak_tflops=peak,
                   skipped_steps=int(saved.get("skipped_steps", 0)),
                   params=[p for p in model.parameters() if p.requires_grad])


def restore(ckpt, data: PreparedData, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Load a checkpoint of any layout into this stage; returns (next step, counters)."""
    meta = checkpoint.read_meta(ckpt)
    if meta["tokenizer_fingerprint"] != data.meta["tokenizer_fingerprint"]:
        raise UserError(f"{ckpt} was trained with a different tokenizer than {data.dir}")
    merged = checkpoint.merged_model_state(ckpt)
    model.load_state_dict(checkpoint.select_state(merged, list(model.state_dict())))
    optim_state: dict = {}
    for shard in sorted(ckpt.glob("optim_stage*.pt")):
        optim_state.update(checkpoint.load_file(ckpt, shard.name))
    checkpoint.load_named_optimizer_state(optimizer, list(model.named_parameters()), optim_state)
    logger.info("resumed from %s (step %d, written by %d stage(s) x %d replica(s))", ckpt,
                meta["step"], meta["stages"], meta["replicas"])
    return int(meta["step"]), checkpoint.load_file(ckpt, "train.pt")


def forward_backward(t: Trainer, step: int) -> StepResult:
    """Run the schedule over this replica's micro-batches (forward, backward, messages)."""
    topo = t.topo
    t.model.train()
    torch.manual_seed(t.job.run.seed * 100_003 + step * 1009 + topo.rank)  # dropout: exact on resume

    def batch(micro: int):
        return t.reader.micro_batch(step, topo.replica, micro, t.micro_batch_size, topo.replicas)

    # Horovod's hooks fire during each gradient's last backward pass: its ring all-reduce starts
    # as soon as it is ready, overlapping the rest of backward.
    return t.runner.train_step(batch, step)


def apply_gradients(t: Trainer, step: int) -> dict[str, float]:
    """Wait for the all-reduce, unscale, agree on overflow, pick the rate, clip and step."""
    # Distributed step 3: wait until every gradient is averaged over the stage's replicas.
    with t.topo.waiting("the gradient all-reduce"):
        t.optimizer.synchronize()
    # Distributed step 4: the tied embedding/head copies of first and last stage sum gradients.
    with t.topo.waiting("the tied-embedding gradient of the other end stage"):
        sync_tied_gradient(t.stage, t.topo.embed_comm)
    # Distributed step 5: unscale and agree across the world whether any gradient overflowed.
    overflow = t.scaler.unscale_and_check(t.params)
    # Distributed step 6: global norm = squares summed over stages (tied copy counted once).
    tied = t.stage.tied_weight if t.stage.last else None
    grad_norm = global_grad_norm([p for p in t.params if p is not tied], t.topo.sum_over_stages)
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
    start = time.perf_counter()
    if t.topo.watchdog:
        t.topo.watchdog.step = step
    result = forward_backward(t, step)
    stats = apply_gradients(t, step)
    return {"loss": result.loss, "wait_s": result.wait_s, "step_s": time.perf_counter() - start,
            "peak_live": result.peak_live, **stats}


@torch.no_grad()
def evaluate(t: Trainer) -> dict[str, float]:
    """Mean validation loss over fixed windows, averaged over replicas; perplexity = exp(loss)."""
    if not t.val_batches:  # the same windows at every evaluation: cut them once
        val = TokenReader(t.data.tokens("val"), t.job.data.seq_len,
                          t.job.training.global_batch_size, t.job.run.seed)
        t.val_batches = val.eval_batches(t.job.training.eval_batches, t.topo.replica,
                                         t.topo.replicas, t.micro_batch_size)
    t.model.eval()
    total, count = t.runner.evaluate(t.val_batches)
    total, count = t.topo.from_last_stage(total), t.topo.from_last_stage(count)
    # Distributed: sums of losses and windows over the replicas -> the mean over all windows.
    with t.topo.waiting("the other replicas' evaluation"):
        sums = hvd.allreduce(torch.tensor([total, count], dtype=torch.float64), op=hvd.Sum,
                             name="eval", process_set=t.topo.process_set)
    loss = float(sums[0] / sums[1])
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def save_checkpoint(t: Trainer, step: int) -> None:
    """Each stage's first replica writes its shard; rank 0 writes the rest and commits."""
    topo, run_dir = t.topo, t.job.run_dir
    tmp = checkpoint.begin(run_dir, step) if topo.rank == 0 else None
    with topo.waiting("the checkpoint barrier"):
        barrier()
    if topo.replica == 0:
        tmp = checkpoint.checkpoint_dir(run_dir, step).with_suffix(".tmp")
        checkpoint.write_file(tmp, f"model_stage{topo.stage}.pt", t.model.state_dict())
        checkpoint.write_file(tmp, f"optim_stage{topo.stage}.pt", checkpoint.named_optimizer_state(
            t.optimizer, list(t.model.named_parameters())))
    with topo.waiting("the other stages' checkpoint shards"):
        barrier()
    if topo.rank == 0:
        checkpoint.write_file(tmp, "train.pt", {"scaler": t.scaler.state_dict(),
                                                 "skipped_steps": t.skipped_steps})
        meta = {"step": step, "stages": topo.stages, "replicas": topo.replicas,
                "tokenizer_fingerprint": t.data.meta["tokenizer_fingerprint"],
                "model_config": t.model.config.to_dict()}
        path = checkpoint.commit(tmp, meta, dump_toml(t.job), t.data.tokenizer_dir,
                                 t.job.training.keep_checkpoints)
        logger.info("checkpoint %s", path)
    with topo.waiting("rank 0 to finish the checkpoint"):
        barrier()


def write_run_info(t: Trainer) -> None:
    """run_dir/run_info.json: the numbers behind the metrics (for `hvdllm bench` and readers)."""
    topo = t.topo
    # Bytes each rank hands to the all-reduce per step, counted from what the compressor emits.
    compressed = compression_for(t.job.parallel.compression).compress(torch.zeros(1))[0]
    payload = sum(p.numel() for p in t.params) * compressed.element_size() if topo.replicas > 1 else 0
    info = {"world": topo.world, "stages": topo.stages, "replicas": topo.replicas,
            "micro_batches": t.micro_batches, "micro_batch_size": t.micro_batch_size,
            "flops_per_token": t.flops_per_token, "peak_tflops_per_rank": t.peak_tflops,
            "parameters_on_rank0": count_parameters(t.model), "threads": torch.get_num_threads(),
            "allreduce_payload_bytes_rank0": payload,
            "allreduce_dtype": str(compressed.dtype).replace("torch.", ""),
            "device": str(t.device), "torch": torch.__version__, "horovod": horovod.__version__}
    (t.job.run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")


def due(done: int, every: int, total: int) -> bool:
    """Periodic work runs every `every` steps (if > 0) and always after the last step."""
    return done == total or (every > 0 and done % every == 0)


def log_metrics(t: Trainer, window: list[dict], tokens_per_step: int) -> dict:
    """Means over the window's steps: loss (from the last stage, averaged over replicas), gradient
    norm, throughput, MFU and bubble; the rate and loss scale of its last step."""
    topo, last = t.topo, window[-1]
    loss = sum(float(w["loss"]) for w in window) / len(window)
    loss = topo.replica_mean(topo.from_last_stage(loss))
    step_s = sum(w["step_s"] for w in window) / len(window)
    tokens_per_s = tokens_per_step / step_s
    out = {"loss": loss, "lr": last["lr"],
           "grad_norm": sum(w["grad_norm"] for w in window) / len(window),
           "loss_scale": last["loss_scale"], "skipped_steps": last["skipped_steps"],
           "tokens_per_s": tokens_per_s,
           "mfu": t.flops_per_token * tokens_per_s / (t.peak_tflops * 1e12 * topo.world),
           "step_ms": 1000 * step_s}
    if topo.stages > 1:  # share of the step each stage spent waiting, averaged over all ranks
        waited = sum(w["wait_s"] for w in window) / sum(w["step_s"] for w in window)
        out["bubble"] = topo.replica_mean(topo.sum_over_stages(waited) / topo.stages)
        out["bubble_theory"] = bubble_fraction(topo.stages, t.micro_batches)
        out["peak_live_activations"] = float(max(w["peak_live"] for w in window))
    return out


def train(job: JobConfig, resume: str | None = None) -> dict[str, float]:
    """Train on every rank; returns the last metrics (loss averaged over replicas, val loss)."""
    stop = StopRequest()  # before setup: a signal during start-up is honoured after step one
    t = setup(job, resume)
    writer = None
    if t.topo.rank == 0:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        (job.run_dir / "job.toml").write_text(dump_toml(job))
        writer = MetricsWriter(job.run_dir, dump_toml(job), job.training.steps, t.start_step)
        write_run_info(t)
    tokens_per_step = job.training.global_batch_size * job.data.seq_len
    every = job.training
    last: dict[str, float] = {}
    window: list[dict] = []
    run_start = time.perf_counter()
    for step in range(t.start_step, every.steps):
        window.append(train_step(t, step))
        done = step + 1  # steps completed: logs and checkpoints are numbered by it
        metrics: dict[str, float] = {}
        if due(done, every.log_every, every.steps):
            metrics, window = log_metrics(t, window, tokens_per_step), []
        if due(done, every.eval_every, every.steps):
            metrics.update(evaluate(t))
        if metrics:
            metrics["elapsed_s"] = time.perf_counter() - run_start
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
