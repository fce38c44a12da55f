"""`hvdllm plan`: rank every layout of a job on a cluster and say why the best ones win.

Layouts that do not fit the memory per rank are dropped (and counted); the rest are ordered by
predicted step time (the global batch is the same in all, so that is tokens/s). For each shown
layout the reason it is ahead of the next is the cost term that differs most between the two.
"""

from __future__ import annotations

from dataclasses import dataclass

from hvdllm.config import JobConfig
from hvdllm.errors import UserError
from hvdllm.log import logger
from hvdllm.plan.cluster import Cluster
from hvdllm.plan.cost import HEADROOM, TERMS, CostModel, Estimate
from hvdllm.layout import LayoutError
from hvdllm.plan.space import candidates, current

GIB = 2.0 ** 30
TIE_S = 1e-5
"""Predicted step times this close are equal (the ranking then prefers fewer knobs)."""
TERM_WORDS = {"compute_s": "compute", "bubble_s": "pipeline bubble", "messages_s": "pipeline messages",
              "exchange_s": "gradient exchange", "optimizer_s": "optimizer step",
              "fixed_s": "per-step work", "shared_s": "shared cores"}
COLUMN = {"compute_s": "compute", "bubble_s": "bubble", "messages_s": "p2p", "exchange_s": "exchange",
          "optimizer_s": "optim", "fixed_s": "fixed", "shared_s": "shared"}


@dataclass
class Plan:
    job: JobConfig
    cluster: Cluster
    nodes: int
    ranks_per_node: int
    ranked: list[Estimate]
    """Layouts that fit, fastest first."""
    too_big: int
    """Layouts dropped because their largest rank does not fit."""
    memory_per_rank: float
    headroom: float
    own: Estimate | None = None
    """The job's own layout on this world, if it has one there."""


def make_plan(job: JobConfig, cluster: Cluster, nodes: int, ranks_per_node: int,
              headroom: float = HEADROOM) -> Plan:
    """Every candidate layout estimated; UserError if none fits."""
    if not 0 <= headroom < 1:
        raise UserError(f"--headroom {headroom}: a share of memory in [0, 1)")
    if nodes < 1 or ranks_per_node < 1:
        raise UserError(f"--nodes ({nodes}) and --gpus-per-node ({ranks_per_node}) must be >= 1")
    if cluster.device == "cuda" and ranks_per_node > cluster.devices_per_node:
        raise UserError(f"--gpus-per-node {ranks_per_node}: the {cluster.name} preset has "
                        f"{cluster.devices_per_node} GPUs per node")
    model = CostModel(job, cluster, ranks_per_node, headroom)
    world = nodes * ranks_per_node
    estimates = [model.estimate(c) for c in candidates(job, world)]
    logger.info("plan: %d layouts of %s on %d x %d ranks estimated", len(estimates),
                job.run.name, nodes, ranks_per_node)
    # Equal predicted times (to TIE_S; an exchange hidden either way): fewer knobs first.
    fitting = sorted((e for e in estimates if e.fits),
                     key=lambda e: (round(e.step_s / TIE_S), knobs(e), e.step_s))
    if not estimates:
        raise UserError(f"no layout of this job fits {world} ranks: training.global_batch_size "
                        f"({job.training.global_batch_size}) has no split over them")
    if not fitting:
        least = min(estimates, key=lambda e: e.peak_bytes)
        raise UserError(f"no layout fits {model.memory_per_rank() / GIB:.1f} GiB per rank; the "
                        f"smallest ({least.candidate.label()}) needs {least.peak_bytes / GIB:.1f} GiB")
    try:
        own = model.estimate(current(job, world))
    except LayoutError:
        own = None
    return Plan(job, cluster, nodes, ranks_per_node, fitting, len(estimates) - len(fitting),
                model.memory_per_rank(), headroom, own)


def knobs(e: Estimate) -> int:
    """How many non-default knobs a layout turns (ZeRO-1, checkpointing, compression, stages)."""
    c = e.candidate
    return (c.zero > 0) + (c.checkpointing != "none") + (c.compression != "none") + (c.stages > 1)


def reason(better: Estimate, worse: Estimate) -> str:
    """Why `better` is ahead: the term it saves most on (and what it pays elsewhere)."""
    if round(worse.step_s / TIE_S) == round(better.step_s / TIE_S):
        return "the same predicted time with fewer knobs turned"
    gains = {t: getattr(worse, t) - getattr(better, t) for t in TERMS}
    won = max(gains, key=gains.get)
    lost = min(gains, key=gains.get)
    text = f"{1000 * gains[won]:.1f} ms less {TERM_WORDS[won]}"
    if gains[lost] < 0:
        text += f", {1000 * -gains[lost]:.1f} ms more {TERM_WORDS[lost]}"
    return text


def own_line(p: Plan) -> str:
    """Where the job's own layout stands."""
    if p.own is None:
        return "the job's own layout does not fit this world's ranks"
    e, best = p.own, p.ranked[0]
    place = next((i for i, x in enumerate(p.ranked, 1) if x.candidate == e.candidate), None)
    if place:
        where = f"#{place}"
    elif not e.fits:
        where = f"does not fit ({e.peak_bytes / GIB:.1f} GiB per rank)"
    else:
        where = "outside the search (micro-batches over 64 sequences)"
    return (f"the job's own layout ({e.candidate.label()}): {where}, {1000 * e.step_s:.1f} ms, "
            f"{e.step_s / best.step_s - 1:+.1%} against #1")


def plan_text(p: Plan, top: int) -> str:
    """The table of the best `top` layouts, the reasons, and the assumptions behind them."""
    head = (f"{p.job.run.name} ({p.job.model.family} {p.job.model.n_layer} x {p.job.model.n_embd}, "
            f"global batch {p.job.training.global_batch_size} x {p.job.data.seq_len}, "
            f"{p.job.precision.dtype}) on {p.nodes} node(s) x {p.ranks_per_node} rank(s), "
            f"{p.cluster.name}")
    cols = f"{'#':>2}  {'layout':<44} {'step ms':>9} {'tokens/s':>10} {'MFU':>6} {'GiB/rank':>9}  " \
           + "  ".join(f"{COLUMN[t]:>8}" for t in TERMS)
    lines = [head, "", f"{'':>84}{'predicted ms of the step:':>30}", cols]
    shown = p.ranked[:top]
    for i, e in enumerate(shown, 1):
        terms = "  ".join(f"{1000 * getattr(e, t):>8.1f}" for t in TERMS)
        lines.append(f"{i:>2}  {e.candidate.label():<44} {1000 * e.step_s:>9.1f} "
                     f"{e.tokens_per_s:>10,.0f} {100 * e.mfu:>5.1f}% {e.peak_bytes / GIB:>9.2f}  {terms}")
    lines += ["", "why each is ahead of the next:"]
    for i, (a, b) in enumerate(zip(shown, p.ranked[1:top + 1]), 1):
        lines.append(f"  #{i} over #{i + 1}: {reason(a, b)}")
    lines += ["", own_line(p), f"{len(p.ranked)} layouts fit, {p.too_big} do not fit "
              f"{p.memory_per_rank / GIB:.1f} GiB per rank (the memory less {p.headroom:.0%} headroom)",
              f"numbers: {p.cluster.source}"]
    if p.cluster.calibrated_model:
        lines.append(f"calibrated on the model: {p.cluster.calibrated_model}")
    lines += [f"assumed: {n}" if not n.startswith("assumed") else n for n in p.cluster.notes]
    best = p.ranked[0].candidate
    lines += ["", "run the best:", "  " + " ".join(f"--set {s}" for s in best.sets())]
    return "\n".join(lines) + "\n"
