"""`hvdllm train`: the training loop, run on every rank.

Read top to bottom: set up (trainer.py: Horovod and the rank grid, the run directory, data, the
model stage, optimizer, resume), then each step (step.py)
    forward/backward over the micro-batches   -> Horovod all-reduces gradients during backward;
                                                 pipeline stages pass activations by mpi4py
    synchronize, tie, unscale, agree overflow -> every rank takes the same decision
    gradient norm, learning rate, clip, step
then log, evaluate and checkpoint (resume.py) on their schedules. One process, data parallel and
pipeline layouts all run this same code; with one stage the pipeline is plain gradient
accumulation.
"""

from __future__ import annotations

import json
import time
from typing import Callable

import horovod
import torch

from hvdllm.config import JobConfig, dump_toml
from hvdllm.log import logger
from hvdllm.metrics import MetricsWriter
from hvdllm.models import count_parameters
from hvdllm.parallel.schedules import bubble_fraction
from hvdllm.preemption import Preempted, StopRequest
from hvdllm.profile.spans import StepSpans
from hvdllm.profile.tracing import Tracer, make_tracer
from hvdllm.train.memory import rank_memory, record_peaks, startup_line
from hvdllm.train.observe import chart_due, draw_pipeline, usage_metrics
from hvdllm.train.resume import save_checkpoint
from hvdllm.train.step import evaluate, train_step
from hvdllm.train.trainer import Trainer, setup


def write_run_info(t: Trainer, memory: dict | None = None) -> None:
    """run_dir/run_info.json: the numbers behind the metrics (for `hvdllm bench` and readers)."""
    topo, layout = t.topo, t.topo.layout
    collectives = t.sync.bytes_per_step()
    info = {"world": topo.world, "stages": topo.stages, "replicas": topo.replicas,
            "micro_batches": layout.micro_batches, "micro_batch_size": layout.micro_batch_size,
            "flops_per_token": t.flops_per_token, "peak_tflops_per_rank": t.peak_tflops,
            "parameters_on_rank0": count_parameters(t.model), "threads": torch.get_num_threads(),
            "allreduce_payload_bytes_rank0": collectives["allreduce_payload_bytes"],
            "allreduce_dtype": collectives["allreduce_dtype"],
            "device": str(t.device), "torch": torch.__version__, "horovod": horovod.__version__}
    info.update({f"{k}_rank0" if k.endswith("_bytes") else k: v for k, v in collectives.items()
                 if k.startswith(("reducescatter", "allgather"))})  # ZeRO-1's two collectives
    if memory:
        info["memory"] = memory  # per-rank bytes (train/memory.py); measured peaks added at the end
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
           "step_ms": 1000 * step_s, "world_size": topo.world}
    if topo.stages > 1:  # share of the step each stage spent waiting, averaged over all ranks
        waited = sum(w["wait_s"] for w in window) / sum(w["step_s"] for w in window)
        out["bubble"] = topo.replica_mean(topo.sum_over_stages(waited) / topo.stages)
        out["bubble_theory"] = bubble_fraction(topo.stages, topo.layout.micro_batches)
        out["peak_live_activations"] = float(max(w["peak_live"] for w in window))
    return out


def train(job: JobConfig, resume: str | None = None, fresh: bool = False) -> dict[str, float]:
    """Train on every rank; returns the last metrics (loss averaged over replicas, val loss).

    resume: None (a new run), "latest", "auto" or a path (see checkpoint.resume_candidates);
    fresh: move a previous run in the run directory aside first (train/run_dir.py).
    """
    from hvdllm.train.elastic import launched_elastic, train_elastic

    if launched_elastic():  # horovodrun --min-np/--max-np/--host-discovery-script
        return train_elastic(job, resume, fresh)
    stop = StopRequest()  # before setup: a signal during start-up is honoured after step one
    t = setup(job, resume, fresh)
    memory = rank_memory(t)  # every rank: exact counts and one measured micro-batch, gathered
    logger.info("%s", startup_line(memory))
    writer = None
    if t.topo.rank == 0:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        (job.run_dir / "job.toml").write_text(dump_toml(job))
        writer = MetricsWriter(job.run_dir, dump_toml(job), job.training.steps, t.start_step)
        write_run_info(t, memory)
    # None unless training.profile or parallel.horovod_timeline: then nothing is traced at all.
    tracer = make_tracer(job.run_dir, t.topo.rank, job.training.profile, t.horovod_timeline,
                         job.training.profile_start_step, job.training.profile_steps,
                         t.start_step, job.training.steps, t.device.type == "cuda")
    try:
        last = run_steps(t, writer, tracer, stop)
    except Preempted:
        if tracer:
            tracer.stop()  # what was recorded is written
        raise
    except BaseException:
        if tracer:  # not the timeline: with Horovod down its writer thread would never answer
            tracer.stop(timeline=False)
        raise
    finally:
        if writer:
            writer.close()
    record_peaks(t, memory, job.run_dir / "run_info.json")  # every rank's measured peak
    if "val_loss" in last:
        logger.info("done: val loss %.4f, val ppl %.2f", last["val_loss"], last["val_ppl"])
    return last


def run_steps(t: Trainer, writer: MetricsWriter | None, tracer: Tracer | None,
              stop: StopRequest,
              after_step: Callable[[int], None] | None = None) -> dict[str, float]:
    """The steps from the start step to the end; logs, evaluates, draws and checkpoints on
    their schedules. Raises Preempted after the checkpoint of a signalled step. after_step(done)
    ends each step (elastic mode commits there)."""
    every = t.job.training
    tokens_per_step = every.global_batch_size * t.job.data.seq_len
    last: dict[str, float] = {}
    window: list[dict] = []
    run_start = time.perf_counter()
    for step in range(t.start_step, every.steps):
        done = step + 1  # steps completed: logs and checkpoints are numbered by it
        if tracer:
            tracer.before_step(done)
        spans = StepSpans(label=bool(tracer and tracer.recording and tracer.torch_profile))
        record = train_step(t, step, spans)
        window.append(record)
        if tracer:
            tracer.after_step(done)
        metrics: dict[str, float] = {}
        if due(done, every.log_every, every.steps):
            metrics = {**log_metrics(t, window, tokens_per_step), **usage_metrics(t, window)}
            window = []
        if due(done, every.eval_every, every.steps):
            metrics.update(evaluate(t))
        if metrics:
            metrics["elapsed_s"] = time.perf_counter() - run_start
            last.update(metrics)
            if writer:
                writer.log(done, metrics)
                if "loss" in metrics:
                    writer.console(done, last, time.perf_counter() - run_start, done - t.start_step)
        if chart_due(done, every.pipeline_chart_every, t.start_step, every.steps):
            draw_pipeline(t, writer, done, spans, record["step_s"])
        # Preemption: all ranks agree whether any was signalled, so they stop after the same step.
        signalled = int(t.topo.world_max(stop.signum)) if done < every.steps else 0
        if signalled or due(done, every.checkpoint_every, every.steps):
            save_checkpoint(t, done)
        if signalled:
            stop.honoured()
            raise Preempted(done, signalled)
        if after_step:
            after_step(done)
    return last
