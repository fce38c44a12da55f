"""`hvdllm bench --plan`: the planner's predictions against measured runs, side by side.

The bench calibrates this machine first (hvdllm.plan.calibrate, written to OUT/cluster.json),
then for each layout below predicts step time and the largest rank's peak memory with the cost
model and runs the real `hvdllm train` once with the same settings (threads per rank as the
model assumes: the cores over the ranks, at least 1). It reports each error, the medians, and
whether the layout the planner ranks first among these is within 10 % of the fastest measured.
Layouts on this node (more ranks than cores share them: oversubscribed), and (not --quick) a
data-parallel and a 2-stage layout on 2 namespace hosts x 1 rank over 10 and 1 Gbit/s links
(hvdllm.launch.hosts; as root), planned as 2 nodes with half the cores each and that link.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

from hvdllm.bench.configs import Config
from hvdllm.bench.network import hosts_start
from hvdllm.bench.runner import launch, run_info, timed_step_s
from hvdllm.config import load_job
from hvdllm.errors import UserError
from hvdllm.log import logger
from hvdllm.launch.hosts import namespace_hosts
from hvdllm.launch.netns import rate_bits
from hvdllm.plan.calibrate import calibrate
from hvdllm.plan.cluster import Cluster, with_links
from hvdllm.plan.cost import TERMS, CostModel
from hvdllm.plan.space import Candidate

WARMUP = 2
HOST_LINKS = ("10gbit", "1gbit")
"""The namespace-host links the layouts are also run over (not --quick)."""
THIS_NODE = "this node"
PATHS = ("run.dir=", "data.dir=")
"""Settings of this machine's paths: not recorded with the job (tests replay the rest)."""
MiB = 2 ** 20


def validation_layouts(gbs: int, quick: bool) -> list[tuple[Candidate, str]]:
    """The layouts compared and where they run: 1-4 stages, replicas, ZeRO-1, checkpointing,
    compression, both schedules, 1-4 ranks on this node; data parallel and 2 stages on 2 hosts
    over each of HOST_LINKS (quick: three layouts on this node)."""
    def c(p: int, r: int, mbs: int, **kw) -> Candidate:
        return Candidate(p, r, gbs // (r * mbs), mbs, **kw)

    half = max(1, gbs // 4)
    rows = [c(1, 1, 2 * half), c(1, 2, half), c(2, 1, half)]
    if not quick:
        rows += [c(1, 1, 2 * half, checkpointing="blocks"), c(1, 2, half, zero=1),
                 c(1, 2, half, compression="fp16"),
                 c(2, 1, half, schedule="gpipe", checkpointing="blocks"),
                 c(2, 2, half), c(4, 1, half), c(1, 4, half)]
    here = [(r, THIS_NODE) for r in rows]
    return here if quick else here + [(r, link) for link in HOST_LINKS for r in rows[1:3]]


def measure(job_path: str, sets: list[str], out: Path, cand: Candidate, steps: int,
            repeat: int, place: str = THIS_NODE) -> tuple[float, int]:
    """One launch of the layout (here, or one rank per namespace host over the link `place`):
    its median step time and the largest rank's measured peak."""
    threads = max(1, (os.cpu_count() or 1) // cand.world)
    name = f"{place}-{cand.label()}-{repeat}".replace(", ", "_").replace(" ", "")
    cfg = Config(cand.label(), cand.world, cand.sets())
    if place == THIS_NODE:
        elapsed = launch(cfg, job_path, sets, out / "runs" / name, WARMUP + steps + 1, threads)
    else:
        with namespace_hosts(cand.world, rate=place, prefix="hvdp") as hosts:
            start = hosts_start(hosts, cfg, hosts.write_agent(hosts.dir),
                                hosts.write_ssh(hosts.dir / "ssh"))
            elapsed = launch(cfg, job_path, sets, out / "runs" / name, WARMUP + steps + 1,
                             threads, start)
    return timed_step_s(elapsed, WARMUP), run_info(out / "runs" / name)["memory"]["measured_peak_max"]


def place_model(job, cluster: Cluster, cand: Candidate, place: str) -> CostModel:
    """The cost model of a layout's place: this node, or its hosts as nodes of one rank with
    an equal share of this machine's cores and memory and the link's rate between them."""
    if place == THIS_NODE:
        return CostModel(job, cluster, ranks_per_node=cand.world)
    share = replace(cluster, devices_per_node=max(1, cluster.devices_per_node // cand.world),
                    device_memory_bytes=cluster.device_memory_bytes / cand.world, notes=[])
    return CostModel(job, with_links(share, inter_gbit=rate_bits(place) / 1e9), ranks_per_node=1)


def plan_bench(job_path: str, sets: list[str], out: Path, quick: bool = False, repeats: int = 0,
               steps: int = 0) -> dict:
    """Calibrate, predict and run every layout `repeats` times (alternating: drift hits every
    layout alike); write bench-plan.json and .md to `out`."""
    job = load_job(job_path, sets)
    if job.model.n_layer < 4 and not quick:
        raise UserError(f"hvdllm bench --plan has a 4-stage row: model.n_layer = "
                        f"{job.model.n_layer} must be at least 4 (or use --quick)")
    if job.training.global_batch_size % 16 and not quick:
        raise UserError("hvdllm bench --plan splits the global batch over up to 4 replicas x 4 "
                        "micro-batches: training.global_batch_size must be a multiple of 16")
    steps, repeats = steps or (3 if quick else 5), repeats or (1 if quick else 2)
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    cluster = calibrate(job_path, sets, out / "cluster.json")
    sets = [*sets, f"data.dir={job.data_dir.resolve()}"]
    layouts = validation_layouts(job.training.global_batch_size, quick)
    runs: dict[tuple[Candidate, str], list[tuple[float, int]]] = {k: [] for k in layouts}
    for r in range(repeats):
        for cand, place in layouts:
            runs[cand, place].append(measure(job_path, sets, out, cand, steps, r, place))
            logger.info("bench --plan %d/%d %-10s %-38s %.0f ms/step", r + 1, repeats, place,
                        cand.label(), 1000 * runs[cand, place][-1][0])
    rows = [plan_row(place_model(job, cluster, c, place).estimate(c), runs[c, place], place)
            for c, place in layouts]
    summary = {"job": job.run.name, "model": cluster.calibrated_model, "cluster": cluster.source,
               "job_file": job_path, "job_sets": [s for s in sets if not s.startswith(PATHS)],
               "cluster_file": asdict(cluster),
               "global_batch": job.training.global_batch_size, "timed_steps": steps,
               "repeats": repeats,
               "rows": rows, **scores(rows), "seconds": time.time() - start}
    (out / "bench-plan.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "bench-plan.md").write_text(plan_markdown(summary))
    return summary


def plan_row(est, runs: list[tuple[float, int]], place: str) -> dict:
    """Prediction against the repeats' median step time and largest peak."""
    step_s, peak = statistics.median(t for t, _ in runs), max(p for _, p in runs)
    return {"layout": est.candidate.label(), "place": place, "ranks": est.candidate.world,
            "candidate": asdict(est.candidate), "predicted_step_s": est.step_s,
            "measured_step_s": step_s, "measured_step_s_repeats": [t for t, _ in runs],
            "step_error": est.step_s / step_s - 1, "predicted_peak_bytes": est.peak_bytes,
            "measured_peak_bytes": peak, "memory_error": est.peak_bytes / peak - 1,
            "terms_s": {t: getattr(est, t) for t in TERMS}}


def scores(rows: list[dict]) -> dict:
    """Median errors and the planner's pick against the fastest measured layout."""
    here = [r for r in rows if r["place"] == THIS_NODE]  # the choice among the same hardware
    picked = min(here, key=lambda r: r["predicted_step_s"])
    fastest = min(here, key=lambda r: r["measured_step_s"])
    return {"median_step_error": statistics.median(abs(r["step_error"]) for r in rows),
            "median_memory_error": statistics.median(abs(r["memory_error"]) for r in rows),
            "picked": picked["layout"], "fastest": fastest["layout"],
            "picked_vs_fastest": picked["measured_step_s"] / fastest["measured_step_s"] - 1}


def plan_markdown(s: dict) -> str:
    lines = [f"# hvdllm bench --plan: {s['job']} ({s['model']})", "",
             f"Cluster: {s['cluster']}. Global batch {s['global_batch']}; median of "
             f"{s['repeats']} alternating launches per layout x {s['timed_steps']} timed steps.", "",
             "| layout | where | ranks | predicted ms | measured ms | error | predicted MiB "
             "| measured MiB | error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        lines.append(f"| {r['layout']} | {r['place']} | {r['ranks']} | {1000 * r['predicted_step_s']:.0f} | "
                     f"{1000 * r['measured_step_s']:.0f} | {100 * r['step_error']:+.0f}% | "
                     f"{r['predicted_peak_bytes'] / MiB:,.0f} | {r['measured_peak_bytes'] / MiB:,.0f} | "
                     f"{100 * r['memory_error']:+.0f}% |")
    lines += ["", f"Median step-time error {100 * s['median_step_error']:.1f} % (target 15 %), "
              f"median memory error {100 * s['median_memory_error']:.1f} % (target 10 %). "
              f"The planner's first choice on this node ({s['picked']}) measured "
              f"{100 * s['picked_vs_fastest']:+.1f} % against the fastest ({s['fastest']}; target "
              f"within 10 %)."]
    return "\n".join(lines) + "\n"
