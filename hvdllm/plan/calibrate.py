"""`hvdllm calibrate JOB -o FILE`: this machine's own rates for the planner, in a short run.

- Compute, for each thread count a rank may get here (1, 2, 4, ... up to the cores):
  hvdllm.plan.measure on cores / threads ranks at once times a block (with and without
  activation checkpointing), the embedding and the head + loss at several micro-batch sizes,
  and an optimizer step.
- Scaled to real steps: short one-rank launches of the real `hvdllm train` (one and two
  micro-batches per step, as many at once as the probe ran ranks) give the factor from the
  probe's pieces to a real micro-batch and the loop's own per-step work (data, loss averaging,
  logging, the optimizer step).
- Links: hvdllm.plan.probe on 2 ranks (Horovod all-reduce and mpi4py messages by size).
- MFU's peak: a dense matmul on one thread (hvdllm.metrics.measure_peak_tflops), per core.

The result holds for the job's block shape (cost.model_shape): any block count, layout or
batch, but another width, vocabulary, sequence length or dtype needs its own calibration.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import statistics
import tempfile
from pathlib import Path

import psutil

from hvdllm.bench.configs import Config
from hvdllm.bench.launcher import module_command, run_ranks, set_args
from hvdllm.bench.runner import launch, timed_step_s
from hvdllm.config import load_job
from hvdllm.data import prepare
from hvdllm.errors import UserError
from hvdllm.log import logger
from hvdllm.plan.cluster import Cluster, Link, Rates

WARMUP, TIMED = 2, 4


def thread_counts(cores: int) -> list[int]:
    """1, 2, 4, ... and the core count itself."""
    counts, t = [], 1
    while t < cores:
        counts.append(t)
        t *= 2
    return [*counts, cores]


def measure_pieces(job_path: str, sets: list[str], work: Path, threads: int, cores: int) -> dict:
    out = work / f"pieces-t{threads}.json"
    ranks = max(1, cores // threads)
    run_ranks(ranks, module_command("hvdllm.plan.measure", job_path, str(out), str(threads),
                                    *set_args(sets)), f"calibrate: compute probe, {threads} thread(s)")
    return json.loads(out.read_text())


def loop_seconds(job_path: str, sets: list[str], work: Path, threads: int, copies: int,
                 mbs: int, m: int) -> float:
    """Median step time of `copies` one-rank launches at once (m micro-batches of mbs each), so
    that each shares the node as the probe's ranks did."""
    from concurrent.futures import ThreadPoolExecutor

    from hvdllm.plan.space import Candidate

    cfg = Config(f"calibrate t{threads} m{m}", 1,
                 [*Candidate(1, 1, m, mbs).sets(), f"training.global_batch_size={mbs * m}"])
    with ThreadPoolExecutor(copies) as pool:
        runs = pool.map(lambda i: launch(cfg, job_path, sets, work / f"loop-t{threads}-m{m}-{i}",
                                         WARMUP + TIMED + 1, threads), range(copies))
        return statistics.median(timed_step_s(e, WARMUP) for e in runs)


def loop_fit(t1: float, t2: float, pieces_s: float) -> tuple[float, float]:
    """(scale, fixed) from t(1) and t(2) micro-batches: t(m) = m x scale x pieces_s + fixed;
    fixed is kept within [0, t1 / 2] (noise can make t2 < 2 t1 or t2 close to t1)."""
    fixed = min(max(2 * t1 - t2, 0.0), t1 / 2)
    return (t1 - fixed) / pieces_s, fixed


def fit_to_loop(job, job_path: str, sets: list[str], work: Path, threads: int, cores: int,
                probe: Rates) -> Rates:
    """The probe's pieces scaled to what a real step of one and of two micro-batches takes, and
    the loop's own per-step work: t(m) = m x scale x pieces + fixed."""
    from hvdllm.plan.cost import CostModel
    from hvdllm.plan.space import Candidate

    mbs, copies = max(1, job.training.micro_batch_size), max(1, cores // threads)
    one = copy.deepcopy(job)
    one.training.global_batch_size = mbs
    pieces = CostModel(one, _bare(threads, probe), ranks_per_node=1).estimate(Candidate(1, 1, 1, mbs))
    pieces_s = pieces.compute_s
    t1, t2 = (loop_seconds(job_path, sets, work, threads, copies, mbs, m) for m in (1, 2))
    scale, fixed = loop_fit(t1, t2, pieces_s)
    logger.info("calibrate: %d thread(s), %d x %d: %.0f ms/step, 2 x %d: %.0f ms; probe %.0f ms "
                "-> pieces x %.2f, %.0f ms per step", threads, 1, mbs, 1000 * t1, mbs, 1000 * t2,
                1000 * pieces_s, scale, 1000 * fixed)
    scaled = {k: [[x, y * scale] for x, y in v] for k, v in probe.pieces.items()}
    return Rates(param_s=probe.param_s, step_s=max(fixed - pieces.optimizer_s, 0.0), pieces=scaled)


def _bare(threads: int, rates: Rates) -> Cluster:
    """A CPU cluster of `threads` cores with the probe's rates and free links, for the one-rank
    launch's prediction."""
    free = Link(0.0, 1e30)
    return Cluster(name="calibration", device="cpu", devices_per_node=threads,
                   device_memory_bytes=float(psutil.virtual_memory().total), peak_tflops=1.0,
                   rates={threads: rates}, allreduce_intra=free, allreduce_inter=free, p2p_intra=free,
                   p2p_inter=free, overlap=0.0, source="")


def calibrate(job_path: str, sets: list[str], out: Path) -> Cluster:
    """Measure, write the Cluster to `out` (JSON) and return it."""
    import torch

    from hvdllm.metrics import measure_peak_tflops
    from hvdllm.plan.cost import model_shape

    job = load_job(job_path, sets)
    if job.model.n_layer < 2:
        raise UserError("hvdllm calibrate times a middle block: model.n_layer must be at least 2")
    prepare(job)
    sets = [*sets, f"data.dir={job.data_dir.resolve()}"]
    cores = os.cpu_count() or 1
    rates = {}
    with tempfile.TemporaryDirectory(prefix="hvdllm-calibrate-") as tmp:
        work = Path(tmp)
        for threads in thread_counts(cores):
            m = measure_pieces(job_path, sets, work, threads, cores)
            probe = Rates(param_s=m["param_s"], pieces=m["pieces"])
            rates[threads] = fit_to_loop(job, job_path, sets, work, threads, cores, probe)
        links = _probe_links(work)
    torch.set_num_threads(1)
    peak = measure_peak_tflops(job.precision.dtype, torch.device("cpu"))
    reduce, p2p = Link(**links["allreduce"]), Link(**links["p2p"])
    cluster = Cluster(
        name=f"calibrated on {socket.gethostname()}", device="cpu", devices_per_node=cores,
        device_memory_bytes=float(psutil.virtual_memory().total), peak_tflops=peak, rates=rates,
        allreduce_intra=reduce, allreduce_inter=reduce, p2p_intra=p2p, p2p_inter=p2p,
        overlap=0.0, source=f"hvdllm calibrate {job_path}: {cores} cores, measured",
        calibrated_model=model_shape(job),
        notes=["CPU ranks: the gradient exchange is not hidden behind backward (overlap 0: "
               "Horovod's sums and copies take the cores backward runs on)",
               "inter-node links = this node's own until set (hvdllm plan --inter-gbit)"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(cluster.to_json())
    logger.info("calibrate: wrote %s", out)
    return cluster


def _probe_links(work: Path) -> dict:
    out = work / "probe.json"
    run_ranks(2, module_command("hvdllm.plan.probe", str(out)), "calibrate: link probe")
    return json.loads(out.read_text())
