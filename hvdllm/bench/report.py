"""Turning `hvdllm bench` measurements into bench.json, bench.md and bench.png."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from pathlib import Path

from hvdllm.bench.cases import markdown as cases_markdown
from hvdllm.bench.configs import Config
from hvdllm.config import JobConfig
from hvdllm.parallel.schedules import bubble_fraction


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (or what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summarise(job: JobConfig, configs: list[Config], results: dict, ranks: int, threads: int,
              repeats: int, steps: int, warmup: int) -> dict:
    """bench.json's content: the machine, the job, one row per configuration, scaling."""
    import horovod
    import torch

    tokens_per_step = job.training.global_batch_size * job.data.seq_len
    base_info = results[configs[0].name].get("info", {})
    same_dtype_one = f"1 rank {job.precision.dtype}"
    rows = []
    for cfg in configs:
        res = results[cfg.name]
        step_s = statistics.median(res["step_s"])
        # The DDP peer runs the model and dtype of its 1-rank baseline: use that row's numbers.
        info = res.get("info") or results[cfg.baseline].get("info", {})
        tps = tokens_per_step / step_s
        row = {"name": cfg.name, "ranks": cfg.ranks, "tokens_per_s": tps, "step_ms": 1000 * step_s,
               "step_ms_repeats": [1000 * s for s in res["step_s"]], "baseline": cfg.baseline,
               "mfu": info["flops_per_token"] * tps / (info["peak_tflops_per_rank"] * 1e12 * cfg.ranks)
               if info else None,
               "peak_tflops_per_rank": info.get("peak_tflops_per_rank"),
               "allreduce_payload_bytes": info.get("allreduce_payload_bytes_rank0") if not cfg.peer else None,
               "framework_overhead": statistics.median(res["overhead"]) if res["overhead"] else None,
               "peak_memory_mib": max(res["peak_bytes"]) / 2**20 if res["peak_bytes"] else None}
        if res["bubble"]:
            m = info["micro_batches"]
            row.update(bubble=statistics.median(res["bubble"]), bubble_theory=bubble_fraction(2, m))
        rows.append(row)
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        r["ratio"] = r["tokens_per_s"] / by_name[r["baseline"]]["tokens_per_s"] if r["baseline"] else 1.0
    one = by_name[same_dtype_one]["tokens_per_s"]
    scaling = {r["name"]: r["tokens_per_s"] / (r["ranks"] * one)
               for r in rows if r["ranks"] > 1 and "pipeline" not in r["name"]}
    return {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count() or 1,
            "torch": torch.__version__, "horovod": horovod.__version__,
            "python": platform.python_version(), "job": job.run.name,
            "model": f"{job.model.family} {job.model.n_layer}x{job.model.n_embd}",
            "parameters": base_info.get("parameters_on_rank0"),
            "global_batch": job.training.global_batch_size, "seq_len": job.data.seq_len,
            "ranks": ranks, "threads_per_rank": threads, "repeats": repeats, "timed_steps": steps,
            "warmup_steps": warmup, "rows": rows, "scaling_efficiency": scaling}


def markdown(s: dict) -> str:
    """bench.md: the table, scaling efficiency and (if run) the case studies."""
    lines = [f"# hvdllm bench: {s['job']} ({s['model']}, {s['parameters'] or '?':,} parameters)", "",
             f"{s['date']} · {s['cpu']} · {s['cores']} cores · {s['threads_per_rank']} thread(s) per rank"
             f" · torch {s['torch']} · Horovod {s['horovod']} · Python {s['python']}", "",
             f"Global batch {s['global_batch']} x {s['seq_len']} tokens; median of {s['repeats']} "
             f"alternating launches x {s['timed_steps']} timed steps ({s['warmup_steps']} warm-up).", "",
             "| configuration | ranks | tokens/s | ms/step | ratio | vs | MFU | bubble (theory) "
             "| all-reduce bytes/rank/step | peak MiB/rank | overhead |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        bubble = f"{100 * r['bubble']:.0f}% ({100 * r['bubble_theory']:.0f}%)" if "bubble" in r else ""
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
        payload = f"{r['allreduce_payload_bytes']:,}" if r["allreduce_payload_bytes"] else ""
        overhead = f"{100 * r['framework_overhead']:.1f}%" if r["framework_overhead"] is not None else ""
        peak = f"{r['peak_memory_mib']:,.0f}" if r.get("peak_memory_mib") else ""
        lines.append(f"| {r['name']} | {r['ranks']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | "
                     f"{r['ratio']:.2f} | {r['baseline'] or '-'} | {mfu} | {bubble} | {payload} "
                     f"| {peak} | {overhead} |")
    lines += ["", "Scaling efficiency (N-rank tokens/s ÷ (N x 1-rank tokens/s), same dtype and threads "
              "per rank):", ""]
    lines += [f"- {name}: {eff:.2f}" for name, eff in s["scaling_efficiency"].items()]
    lines += ["", "Overhead: share of each step's wall-clock time spent outside the training step "
              "(logging, metrics, TensorBoard, the preemption check); the DDP peer has none of these."]
    lines += ["", "Peak MiB/rank: the largest rank's peak resident memory (CPU) or allocated bytes "
              "(GPU), largest over the repeats."]
    if s.get("pipeline_charts"):
        lines += ["", "Pipeline charts (the last step of each pipeline row's first launch):", ""]
        lines += [f"- {name}: ![{name}]({file})" for name, file in s["pipeline_charts"].items()]
    if "case_studies" in s:
        lines += ["", cases_markdown(s["case_studies"], s["ranks"], s["case_steps"])]
    return "\n".join(lines) + "\n"


def plot(s: dict, path: Path) -> None:
    """bench.png: one row per configuration in three panels: tokens/s (DDP in red), peak memory
    per rank, and the pipeline bubble measured beside its theory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = s["rows"][::-1]  # the first row on top
    names, y = [r["name"] for r in rows], range(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.42 * len(rows) + 1.5), sharey=True,
                             gridspec_kw={"width_ratios": [3, 2, 1.4]})
    panels = [("tokens/s (higher is better)", [r["tokens_per_s"] for r in rows], "{:,.0f}"),
              ("peak MiB per rank", [r.get("peak_memory_mib") or 0 for r in rows], "{:,.0f}"),
              ("pipeline bubble %", [100 * r.get("bubble", 0) for r in rows], "{:.0f}")]
    for ax, (label, values, fmt) in zip(axes, panels):
        colors = ["#c44e52" if "DDP" in n else "#4c72b0" for n in names]
        ax.barh(names, values, color=colors)
        for i, v in enumerate(values):
            if v:
                ax.text(v, i, " " + fmt.format(v), va="center", fontsize=7)
        ax.set_xlabel(label, fontsize=9)
        ax.margins(x=0.25)
    theory = [(i, 100 * r["bubble_theory"]) for i, r in zip(y, rows) if "bubble_theory" in r]
    if theory:
        axes[2].scatter([t for _, t in theory], [i for i, _ in theory], marker="|", s=200,
                        color="black", label="theory", zorder=3)
        axes[2].legend(fontsize=7, loc="upper right")
    axes[0].tick_params(axis="y", labelsize=8)
    fig.suptitle(f"hvdllm bench: {s['model']}, {s['cpu'][:40]}, {s['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(s: dict, out: Path) -> None:
    """bench.json, bench.md and bench.png in `out`."""
    (out / "bench.json").write_text(json.dumps(s, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(s))
    plot(s, out / "bench.png")
