"""`hvdllm bench`: side-by-side throughput of layouts, precisions and the DDP peer, in one run.

Every configuration is a separate launch of the real `hvdllm train` (or, for the peer, of
hvdllm.bench.ddp_peer) under mpirun, with the same model, batch, dtype and threads per rank.
Launches alternate (A B C ... A B C ...) so machine drift hits all configurations alike; the first
steps of each launch are warm-up and are not timed; a launch's step time is the median of the
wall-clock time between consecutive steps (logging, metrics and all framework work included), and
a configuration's is the median over its repeats.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from hvdllm.bench.cases import case_studies
from hvdllm.bench.configs import Config, configurations
from hvdllm.bench.launcher import hvdllm_command, module_command, run_ranks, set_args
from hvdllm.bench.report import summarise, write_reports
from hvdllm.config import load_job
from hvdllm.data import prepare
from hvdllm.errors import UserError
from hvdllm.log import logger


def launch(cfg: Config, job_path: str, sets: list[str], run_dir: Path, steps: int,
           threads: int, start: Callable = run_ranks) -> list[float]:
    """One launch; returns the wall-clock seconds after each completed step.

    `start(ranks, cmd, what)` starts the ranks: mpirun here (run_ranks) or on other hosts."""
    all_sets = [*sets, *cfg.sets, f"run.dir={run_dir}", f"training.steps={steps}",
                "training.log_every=1", "training.eval_every=0", "training.eval_batches=1",
                "training.checkpoint_every=0", f"training.threads={threads}",
                f"training.pipeline_chart_every={steps}"]  # drawn after the last step (untimed)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.peer:
        cmd = module_command("hvdllm.bench.ddp_peer", job_path, str(run_dir / "ddp.json"),
                             *set_args(all_sets))
    else:
        cmd = hvdllm_command("train", job_path, *set_args(all_sets))
    start(cfg.ranks, cmd, cfg.name)
    if cfg.peer:
        return json.loads((run_dir / "ddp.json").read_text())["elapsed_s"]
    return [r["elapsed_s"] for r in step_rows(run_dir)]


def step_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows of training steps (those with a loss), in order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def timed_step_s(elapsed: list[float], warmup: int) -> float:
    """Median step time after warm-up; the last step (final evaluation, checkpoint) is excluded."""
    diffs = [b - a for a, b in zip(elapsed[warmup - 1:-1], elapsed[warmup:-1])]
    return statistics.median(diffs)


def run_info(run_dir: Path) -> dict:
    """run_dir/run_info.json (parameters, FLOPs per token, peak), or {} if the run wrote none."""
    path = run_dir / "run_info.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def framework_overhead(rows: list[dict]) -> float:
    """Share of wall-clock time per step spent outside the training step itself (data is inside
    it): logging, metrics files, TensorBoard, the preemption check, the loop."""
    wall = rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]
    inside = sum(r["step_ms"] for r in rows[1:]) / 1000
    return max(0.0, 1 - inside / wall)


def record(result: dict, cfg: Config, run_dir: Path, elapsed: list[float], warmup: int) -> None:
    """Add one launch's step time (and for hvdllm train: run info, bubble, overhead) to `result`."""
    if cfg.timed:  # step n's wall time: elapsed[n - 1] - elapsed[n - 2]
        first, last = cfg.timed
        result["step_s"].append(statistics.median(
            elapsed[n - 1] - elapsed[n - 2] for n in range(first, last + 1)))
    else:
        result["step_s"].append(timed_step_s(elapsed, warmup))
    if cfg.peer:
        result["peak_bytes"].append(json.loads((run_dir / "ddp.json").read_text())["peak_bytes"])
        return
    result["info"] = run_info(run_dir)
    result["peak_bytes"].append(result["info"]["memory"]["measured_peak_max"])
    rows = step_rows(run_dir)[warmup:-1]  # the timed steps
    if "bubble" in rows[0]:
        result["bubble"].append(statistics.median(r["bubble"] for r in rows))
    result["overhead"].append(framework_overhead(rows))


def copy_pipeline_charts(configs: list[Config], out: Path, last_step: int) -> dict[str, str]:
    """The first launch's chart of each pipeline row (its last step) beside the reports, so that
    GPipe and 1F1B are seen side by side: row name -> file name."""
    charts = {}
    for cfg in configs:
        chart = out / "runs" / f"{cfg.name.replace(' ', '_')}-0" / "pipeline" / f"step{last_step:08d}.png"
        if "pipeline" in cfg.name and chart.is_file():
            name = "chart-" + cfg.name.replace(" ", "_").replace("=", "") + ".png"
            shutil.copyfile(chart, out / name)
            charts[cfg.name] = name
    return charts


def bench(job_path: str, sets: list[str], out: Path, ranks: int = 2, quick: bool = False,
          repeats: int = 0, steps: int = 0, warmup: int = 0, case_steps: int = 0) -> dict:
    """Run every configuration `repeats` times, alternating; write bench.json/.md/.png to out."""
    job = load_job(job_path, sets)
    if job.precision.dtype == "fp16":
        raise UserError("hvdllm bench compares fp32 and bf16 rows: set precision.dtype to one of them")
    repeats, steps, warmup = repeats or (2 if quick else 3), steps or (6 if quick else 20), warmup or 2
    threads = job.training.threads or max(1, (os.cpu_count() or 1) // ranks)
    out.mkdir(parents=True, exist_ok=True)
    prepare(job)  # once, before any launch; every launch reads these tokens
    sets = [*sets, f"data.dir={job.data_dir.resolve()}"]
    configs = configurations(ranks, quick, job.precision.dtype, warmup)
    results: dict[str, dict] = {c.name: {"step_s": [], "bubble": [], "overhead": [], "peak_bytes": []}
                                for c in configs}
    start = time.time()
    for r in range(repeats):
        for cfg in configs:  # A B C ... A B C ...: drift hits every configuration alike
            run_dir = out / "runs" / f"{cfg.name.replace(' ', '_')}-{r}"
            elapsed = launch(cfg, job_path, sets, run_dir, warmup + steps + 1, threads)
            record(results[cfg.name], cfg, run_dir, elapsed, warmup)
            logger.info("bench %d/%d %-40s %.1f ms/step", r + 1, repeats, cfg.name,
                        1000 * results[cfg.name]["step_s"][-1])
    summary = summarise(job, configs, results, ranks, threads, repeats, steps, warmup)
    if case_steps:
        summary["case_studies"] = case_studies(job_path, sets, out, ranks, case_steps,
                                               eval_every=max(1, case_steps // 10))
        summary["case_steps"] = case_steps
    summary["pipeline_charts"] = copy_pipeline_charts(configs, out, warmup + steps + 1)
    summary["seconds"] = time.time() - start
    write_reports(summary, out)
    return summary
