"""Seeing inside a run: the pipeline chart of a step, memory and communication per logged step.

- `usage_metrics`: memory now and its high-water mark (the largest rank's), the time a step
  spends in gradient synchronisation (the largest rank's mean over the window) and the bytes
  rank 0 hands to the gradient collectives per step: TensorBoard's memory/ and comm/ scalars.
- `draw_pipeline`: every rank's spans of one step gathered to rank 0 and drawn (profile/gantt.py)
  into run_dir/pipeline/step{N}.png (+ .json, the spans) and TensorBoard's images.
"""

from __future__ import annotations

import json

import horovod.torch as hvd

from hvdllm.metrics import MetricsWriter
from hvdllm.parallel.schedules import bubble_fraction
from hvdllm.profile import gantt
from hvdllm.profile.spans import StepSpans
from hvdllm.train.memory import MIB, measured_now, measured_peak
from hvdllm.train.trainer import Trainer


def collective_bytes(t: Trainer) -> int:
    """Bytes this rank hands to the gradient collectives per step (all-reduce, or ZeRO-1's
    reduce-scatter and all-gather), counted from what the compressor emits."""
    counts = t.sync.bytes_per_step()
    return sum(v for k, v in counts.items() if k.endswith("_payload_bytes"))


def usage_metrics(t: Trainer, window: list[dict]) -> dict[str, float]:
    """Memory and communication of the logged window (a collective: every rank calls it).

    Memory is sampled at the end of the window's last step: `memory_mb` is what the largest rank
    holds then (resident memory on CPU, allocated bytes on a GPU), `memory_peak_mb` the largest
    rank's high-water mark since start (never falls)."""
    sync_s = sum(w["sync_s"] for w in window) / len(window)
    now, peak, sync_s = t.topo.world_maxima([measured_now(t.device), measured_peak(t.device),
                                             sync_s])
    return {"memory_mb": now / MIB, "memory_peak_mb": peak / MIB, "sync_ms": 1000 * sync_s,
            "allreduce_bytes": float(collective_bytes(t))}


def chart_due(done: int, every: int, start_step: int, total: int) -> bool:
    """Draw every `every` steps; with 0 once, at this launch's second step (its first is warm-up)."""
    if every > 0:
        return done % every == 0
    return done == min(start_step + 2, total)


def draw_pipeline(t: Trainer, writer: MetricsWriter | None, done: int, spans: StepSpans,
                  step_s: float) -> None:
    """Gather every rank's spans of step `done` and draw them on rank 0 (a collective)."""
    topo = t.topo
    mine = spans.as_dict(topo.rank, topo.stage, topo.replica, step_s)
    with topo.waiting("the other ranks' step spans (pipeline chart)"):
        records = hvd.allgather_object(mine, name=f"spans.{done}")
    if writer is None:
        return
    bubble = gantt.measured_bubble(records)
    title = (f"{topo.stages} stage(s) x {topo.replicas} replica(s), {t.job.parallel.schedule}, "
             f"m = {topo.layout.micro_batches}: bubble {100 * bubble:.1f}% measured, "
             f"{100 * bubble_fraction(topo.stages, topo.layout.micro_batches):.1f}% in theory")
    path = t.job.run_dir / "pipeline" / f"step{done:08d}.png"
    image = gantt.draw(records, done, title, path)
    path.with_suffix(".json").write_text(json.dumps({"step": done, "bubble": bubble,
                                                     "ranks": records}, indent=1) + "\n")
    writer.image("pipeline/step", image, done)
