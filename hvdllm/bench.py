"""`hvdllm bench`: side-by-side throughput of layouts, precisions and the DDP peer, in one run.

Every configuration is a separate launch of the real `hvdllm train` (or, for the peer, of
hvdllm.bench_ddp) under mpirun, with the same model, batch, dtype and threads per rank. Launches
alternate (A B C ... A B C ...) so machine drift hits all configurations alike; the first steps
of each launch are warm-up and are not timed; a launch's step time is the median of the wall-clock
time between consecutive steps (logging, metrics and all framework work included), and a
configuration's is the median over its repeats.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hvdllm.config import load_job
from hvdllm.data import prepare
from hvdllm.errors import UserError
from hvdllm.log import logger

# OpenMPI as root, more ranks than cores, and yielding instead of busy polling (docs/launching.md)
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_mpi_yield_when_idle": "1", "OMPI_MCA_hwloc_base_binding_policy": "none",
           "OMPI_MCA_rmaps_base_oversubscribe": "1"}


LAUNCH_TIMEOUT_S = 1800
"""A launch that runs longer than this is reported as hung (it would otherwise block the bench)."""


@dataclass
class Config:
    name: str
    ranks: int
    sets: list[str] = field(default_factory=list)
    peer: bool = False
    """Run hvdllm.bench_ddp (torch DDP) instead of hvdllm train."""
    baseline: str = ""
    """Name of the row this one's ratio is taken against."""


def configurations(ranks: int, quick: bool, dtype: str) -> list[Config]:
    """The rows: both precisions on one rank; then, at the job's precision, Horovod and the DDP
    peer on `ranks` ranks and 2-stage pipelines, each with the row it is compared against."""
    one = f"1 rank {dtype}"
    dp, peer = f"{ranks} ranks Horovod {dtype}", f"{ranks} ranks torch DDP {dtype}"
    rows = [Config("1 rank fp32", 1, ["precision.dtype=fp32"]),
            Config("1 rank bf16", 1, ["precision.dtype=bf16"], baseline="1 rank fp32"),
            Config(peer, ranks, peer=True, baseline=one),
            Config(dp, ranks, baseline=peer),
            Config(f"{dp} fp16 compression", ranks, ["parallel.compression=fp16"], baseline=dp)]
    for m in ((4,) if quick else (2, 4, 8)):
        for schedule in ("gpipe", "1f1b"):
            rows.append(Config(f"pipeline P=2 {schedule} m={m} {dtype}", 2,
                               ["parallel.pipeline_stages=2", f"parallel.schedule={schedule}",
                                f"parallel.micro_batches={m}", "training.micro_batch_size=0"], baseline=one))
    return rows


def free_port() -> int:
    """A TCP port nobody listens on now (a fixed one can linger in TIME_WAIT between launches)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(cfg: Config, job_path: str, sets: list[str], run_dir: Path, steps: int,
           threads: int) -> list[float]:
    """One launch; returns the wall-clock seconds after each completed step."""
    all_sets = [*sets, *cfg.sets, f"run.dir={run_dir}", f"training.steps={steps}",
                "training.log_every=1", "training.eval_every=0", "training.eval_batches=1",
                "training.checkpoint_every=0", f"training.threads={threads}"]
    set_args = [a for s in all_sets for a in ("--set", s)]
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.peer:
        cmd = [sys.executable, "-m", "hvdllm.bench_ddp", job_path, str(run_dir / "ddp.json"), *set_args]
    else:
        cmd = [str(Path(sys.executable).parent / "hvdllm"), "train", job_path, *set_args]
    env = dict(os.environ, **MPI_ENV, MASTER_PORT=str(free_port()))  # DDP's rendezvous
    full = ["mpirun", "-np", str(cfg.ranks), *cmd]
    try:
        p = subprocess.run(full, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"bench launch hung for {LAUNCH_TIMEOUT_S} s ({cfg.name}): "
                           f"{shlex.join(full)}") from None
    if p.returncode != 0:
        raise RuntimeError(f"bench launch failed ({cfg.name}): {shlex.join(full)}\n{p.stderr[-3000:]}")
    if cfg.peer:
        return json.loads((run_dir / "ddp.json").read_text())["elapsed_s"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["elapsed_s"] for r in rows if "loss" in r]


def timed_step_s(elapsed: list[float], warmup: int) -> float:
    """Median step time after warm-up; the last step (final evaluation, checkpoint) is excluded."""
    diffs = [b - a for a, b in zip(elapsed[warmup - 1:-1], elapsed[warmup:-1])]
    return statistics.median(diffs)


def run_info(run_dir: Path) -> dict:
    path = run_dir / "run_info.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def timed_rows(run_dir: Path, warmup: int) -> list[dict]:
    """metrics.jsonl rows of the timed steps (after warm-up, without the last step)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r][warmup:-1]


def framework_overhead(rows: list[dict]) -> float:
    """Share of wall-clock time per step spent outside the training step itself (data is inside
    it): logging, metrics files, TensorBoard, the preemption check, the loop."""
    wall = rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]
    inside = sum(r["step_ms"] for r in rows[1:]) / 1000
    return max(0.0, 1 - inside / wall)


def bench(job_path: str, sets: list[str], out: Path, ranks: int = 2, quick: bool = False,
          repeats: int = 0, steps: int = 0, warmup: int = 0, case_steps: int = 0) -> dict:
    """Run every configuration `repeats` times, alternating; write bench.json/.md/.png to out."""
    job = load_job(job_path, sets)
    repeats, steps, warmup = repeats or (2 if quick else 3), steps or (6 if quick else 20), warmup or 2
    threads = job.training.threads or max(1, (os.cpu_count() or 1) // ranks)
    out.mkdir(parents=True, exist_ok=True)
    prepare(job)  # once, before any launch; every launch reads these tokens
    sets = [*sets, f"data.dir={job.data_dir.resolve()}"]
    if job.precision.dtype == "fp16":
        raise UserError("hvdllm bench compares fp32 and bf16 rows: set precision.dtype to one of them")
    configs = configurations(ranks, quick, job.precision.dtype)
    results: dict[str, dict] = {c.name: {"step_s": [], "bubble": [], "overhead": []} for c in configs}
    start = time.time()
    for r in range(repeats):
        for cfg in configs:  # A B C ... A B C ...: drift hits every configuration alike
            run_dir = out / "runs" / f"{cfg.name.replace(' ', '_')}-{r}"
            elapsed = launch(cfg, job_path, sets, run_dir, warmup + steps + 1, threads)
            results[cfg.name]["step_s"].append(timed_step_s(elapsed, warmup))
            if not cfg.peer:
                results[cfg.name]["info"] = run_info(run_dir)
                rows = timed_rows(run_dir, warmup)
                if "bubble" in rows[0]:
                    results[cfg.name]["bubble"].append(statistics.median(r["bubble"] for r in rows))
                results[cfg.name]["overhead"].append(framework_overhead(rows))
            logger.info("bench %d/%d %-40s %.1f ms/step", r + 1, repeats, cfg.name,
                        1000 * results[cfg.name]["step_s"][-1])
    from hvdllm.bench_report import summarise, write_reports

    summary = summarise(job, configs, results, ranks, threads, repeats, steps, warmup)
    if case_steps:
        from hvdllm.bench_cases import case_studies

        summary["case_studies"] = case_studies(job_path, sets, out, ranks, case_steps,
                                               eval_every=max(1, case_steps // 10))
        summary["case_steps"] = case_steps
    summary["seconds"] = time.time() - start
    write_reports(summary, out)
    return summary
