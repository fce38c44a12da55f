"""`hvdllm bench --memory`: per-rank peak memory and step time of the layouts that save memory.

Rows, side by side in one run: one stage on one rank, 2 and 4 pipeline stages, plain data
parallelism against ZeRO-1 at R = 2, and activation checkpointing of every block against none.
Each launch is a real `hvdllm train` (hvdllm.bench.runner.launch); launches alternate
(A B C ... A B C ...) as in the throughput rows. What a row reports comes from the run's own
run_info.json (hvdllm.train.memory): for the rank with the largest measured peak, that peak (CUDA's
max allocated, or on CPU the peak resident memory) next to what the memory model predicted for
that rank, the optimizer state and the activations it counted; and the median step time of the
repeats (with their spread) against the row's baseline.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from hvdllm.bench.configs import Config
from hvdllm.bench.runner import launch, run_info, timed_step_s
from hvdllm.config import load_job
from hvdllm.data import prepare
from hvdllm.errors import UserError
from hvdllm.log import logger

MiB = 2 ** 20


def memory_configurations() -> list[Config]:
    """The rows and the row each one's step time is compared against."""
    one, dp = "1 stage, 1 rank", "data parallel R=2"
    return [Config(one, 1),
            Config("2 stages", 2, ["parallel.pipeline_stages=2"], baseline=one),
            Config("4 stages", 4, ["parallel.pipeline_stages=4"], baseline=one),
            Config(dp, 2),
            Config("ZeRO-1 R=2", 2, ["parallel.zero=1"], baseline=dp),
            Config("1 rank, activation checkpointing", 1,
                   ["training.activation_checkpointing=blocks"], baseline=one)]


def largest_rank(info: dict) -> dict:
    """run_info's memory entry of the rank with the largest measured peak."""
    ranks = info.get("memory", {}).get("ranks", [])
    if not ranks:
        raise UserError("the run wrote no per-rank memory to run_info.json")
    return max(ranks, key=lambda r: r["measured_peak"])


def memory_row(cfg: Config, infos: list[dict], step_s: list[float]) -> dict:
    """One row from the repeats' run_info.json files and step times."""
    peaks = [largest_rank(i) for i in infos]
    worst = max(peaks, key=lambda r: r["measured_peak"])
    per_rank = infos[-1]["memory"]["ranks"]
    return {"name": cfg.name, "ranks": cfg.ranks, "baseline": cfg.baseline,
            "step_ms": 1000 * statistics.median(step_s),
            "step_ms_repeats": [1000 * s for s in step_s],
            "largest_rank": worst["rank"], "stage": worst["stage"],
            "measured_peak": worst["measured_peak"], "predicted_peak": worst["predicted_peak"],
            "peak_error": worst["measured_peak"] / worst["predicted_peak"] - 1,
            "optimizer_per_rank": max(r["optimizer"] for r in per_rank),
            "activations": max(r["activations"] for r in per_rank),
            "fixed": worst["fixed"]}


def memory_bench(job_path: str, sets: list[str], out: Path, quick: bool = False,
                 repeats: int = 0, steps: int = 0, warmup: int = 2) -> dict:
    """Run every row `repeats` times, alternating; write bench-memory.json and .md to out."""
    job = load_job(job_path, sets)
    if job.model.n_layer < 4:
        raise UserError(f"hvdllm bench --memory has a 4-stage row: model.n_layer = "
                        f"{job.model.n_layer} must be at least 4")
    repeats, steps = repeats or (2 if quick else 3), steps or (3 if quick else 6)
    out.mkdir(parents=True, exist_ok=True)
    prepare(job)
    sets = [*sets, f"data.dir={job.data_dir.resolve()}"]
    configs = memory_configurations()
    times: dict[str, list[float]] = {c.name: [] for c in configs}
    infos: dict[str, list[dict]] = {c.name: [] for c in configs}
    start = time.time()
    for r in range(repeats):
        for cfg in configs:  # alternating: drift hits every row alike
            run_dir = out / "runs" / f"{cfg.name.replace(' ', '_').replace(',', '')}-{r}"
            threads = job.training.threads or max(1, (os.cpu_count() or 1) // cfg.ranks)
            elapsed = launch(cfg, job_path, sets, run_dir, warmup + steps + 1, threads)
            times[cfg.name].append(timed_step_s(elapsed, warmup))
            infos[cfg.name].append(run_info(run_dir))
            logger.info("bench --memory %d/%d %-34s %.0f ms/step, peak %.0f MiB", r + 1, repeats,
                        cfg.name, 1000 * times[cfg.name][-1],
                        largest_rank(infos[cfg.name][-1])["measured_peak"] / MiB)
    rows = [memory_row(c, infos[c.name], times[c.name]) for c in configs]
    by_name = {row["name"]: row for row in rows}
    for row in rows:
        base = by_name.get(row["baseline"])
        row["step_ratio"] = row["step_ms"] / base["step_ms"] if base else 1.0
    summary = {"job": job.run.name,
               "model": f"{job.model.family} {job.model.n_layer}x{job.model.n_embd}",
               "global_batch": job.training.global_batch_size, "seq_len": job.data.seq_len,
               "micro_batch_size": job.training.micro_batch_size, "dtype": job.precision.dtype,
               "repeats": repeats, "timed_steps": steps, "warmup_steps": warmup, "rows": rows,
               "seconds": time.time() - start}
    (out / "bench-memory.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "bench-memory.md").write_text(memory_markdown(summary))
    return summary


def memory_markdown(s: dict) -> str:
    """bench-memory.md: the table, one row per layout."""
    lines = [f"# hvdllm bench --memory: {s['job']} ({s['model']}, {s['dtype']})", "",
             f"Global batch {s['global_batch']} x {s['seq_len']} tokens, micro-batch "
             f"{s['micro_batch_size'] or 'derived'}; median of {s['repeats']} alternating launches "
             f"x {s['timed_steps']} timed steps ({s['warmup_steps']} warm-up). Peak: the rank with "
             f"the largest measured peak, next to what the memory model predicted for it.", "",
             "| configuration | ranks | ms/step (repeats) | step ratio | vs "
             "| peak MiB (rank, stage) | predicted MiB | error | optimizer MiB/rank "
             "| activations MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        spread = ", ".join(f"{t:.0f}" for t in r["step_ms_repeats"])
        lines.append(f"| {r['name']} | {r['ranks']} | {r['step_ms']:.0f} ({spread}) | "
                     f"{r['step_ratio']:.2f} | {r['baseline'] or '-'} | "
                     f"{r['measured_peak'] / MiB:,.0f} ({r['largest_rank']}, {r['stage']}) | "
                     f"{r['predicted_peak'] / MiB:,.0f} | {100 * r['peak_error']:+.1f}% | "
                     f"{r['optimizer_per_rank'] / MiB:,.1f} | {r['activations'] / MiB:,.1f} |")
    lines += ["", f"Fixed per-process memory in the model (imports, communication buffers): "
              f"{s['rows'][0]['fixed'] / MiB:,.0f} MiB on the one-rank row."]
    return "\n".join(lines) + "\n"
