"""One optimizer step, top to bottom, with each distributed step where it happens."""

from __future__ import annotations

import math
import time

import horovod.torch as hvd
import torch

from hvdllm.data import TokenReader
from hvdllm.optim import clip_gradients, set_lr
from hvdllm.parallel.pipeline import StepResult, sync_tied_gradient
from hvdllm.profile.spans import StepSpans
from hvdllm.train.trainer import Trainer


def forward_backward(t: Trainer, step: int, spans: StepSpans) -> StepResult:
    """Run the schedule over this replica's micro-batches (forward, backward, messages)."""
    topo, layout = t.topo, t.topo.layout
    t.model.train()
    torch.manual_seed(t.job.run.seed * 100_003 + step * 1009 + topo.rank)  # dropout: exact on resume

    def batch(micro: int):
        with spans.span("data", micro):
            return t.reader.micro_batch(step, topo.replica, micro, layout.micro_batch_size,
                                        topo.replicas)

    # Horovod's hooks fire during each gradient's last backward pass: its ring all-reduce starts
    # as soon as it is ready, overlapping the rest of backward.
    return t.runner.train_step(batch, step, spans)


def synchronize_gradients(t: Trainer) -> bool:
    """Wait for the all-reduce, sum the tied copies, unscale; returns the world-agreed overflow."""
    # Distributed steps 3 and 4: gradients averaged over the stage's replicas (all-reduce, or
    # ZeRO-1's reduce-scatter), and the tied embedding/head copies of the first and last stage
    # summed (after an all-reduce; before a reduce-scatter, whose slices would not line up).
    with t.topo.waiting("the gradient all-reduce (or reduce-scatter) and the tied gradient"):
        t.sync.synchronize(tie=lambda: sync_tied_gradient(t.stage, t.topo.embed_set))
    # Distributed step 5: unscale and agree across the world whether any gradient overflowed.
    return t.scaler.unscale_and_check(t.params)


def update_weights(t: Trainer, step: int, overflow: bool) -> dict[str, float]:
    """Global norm, learning rate, clipping and the optimizer step (skipped on overflow)."""
    # Distributed step 6: global norm = squares summed over stages (tied copy counted once).
    tied = t.stage.tied_weight if t.stage.last else None
    grad_norm = t.sync.grad_norm(exclude=tied, sum_over_stages=t.topo.sum_over_stages)
    lr = t.schedule(step, grad_norm)
    set_lr(t.optimizer, lr)
    if overflow:
        t.skipped_steps += 1
    else:
        clip_gradients(t.params, grad_norm, t.job.training.grad_clip)
        t.sync.step()
    t.scaler.update(overflow)
    t.sync.zero_grad()
    return {"lr": lr, "grad_norm": grad_norm, "loss_scale": t.scaler.scale,
            "skipped_steps": t.skipped_steps}


def train_step(t: Trainer, step: int, spans: StepSpans | None = None) -> dict[str, float]:
    """One optimizer step over the global batch; returns this rank's metrics. Its spans
    (profile/spans.py) are recorded in `spans` (the pipeline chart's material)."""
    spans = spans or StepSpans()
    start = spans.begin()  # the step's time and its spans share this origin
    if t.topo.watchdog:
        t.topo.watchdog.step = step
    result = forward_backward(t, step, spans)
    with spans.span("sync"):
        overflow = synchronize_gradients(t)
    with spans.span("optimizer"):
        stats = update_weights(t, step, overflow)
    return {"loss": result.loss, "wait_s": result.wait_s, "step_s": time.perf_counter() - start,
            "sync_s": spans.total("sync"), "peak_live": result.peak_live, **stats}


@torch.no_grad()
def evaluate(t: Trainer) -> dict[str, float]:
    """Mean validation loss over fixed windows, averaged over replicas; perplexity = exp(loss)."""
    if not t.val_batches:  # the same windows at every evaluation: cut them once
        val = TokenReader(t.data.tokens("val"), t.job.data.seq_len,
                          t.job.training.global_batch_size, t.job.run.seed)
        t.val_batches = val.eval_batches(t.job.training.eval_batches, t.topo.replica,
                                         t.topo.replicas, t.topo.layout.micro_batch_size)
    t.model.eval()
    total, count = t.runner.evaluate(t.val_batches)
    total, count = t.topo.from_last_stage(total), t.topo.from_last_stage(count)
    # Distributed: sums of losses and windows over the replicas -> the mean over all windows.
    with t.topo.waiting("the other replicas' evaluation"):
        sums = hvd.allreduce(torch.tensor([total, count], dtype=torch.float64), op=hvd.Sum,
                             name="eval", process_set=t.topo.process_set)
    loss = float(sums[0] / sums[1])
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
