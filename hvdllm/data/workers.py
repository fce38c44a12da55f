"""Running this rank's units: in this process, or on a pool of single-threaded worker processes.

With one worker the units run here and the tokenizer may use its own threads (Rust, every core).
With several, each worker is a separate process (`spawn`, so nothing is inherited from an MPI
rank) that encodes on one thread (TOKENIZERS_PARALLELISM=false): reading, JSON parsing and
encoding then all run in parallel, which measures faster than one process with the tokenizer's
threads (docs/performance.md). Workers report the bytes they read through one shared counter,
so the parent's progress bar moves while a unit is still in flight.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Callable

from hvdllm.data.shards import UnitResult, UnitTask, encode_unit

REPORT_BYTES = 1 << 20
"""A worker adds to the shared progress counter every this many bytes read."""

_counter = None
_unreported = 0


def cores_per_rank() -> int:
    """Cores this process may use, shared among the ranks on this node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") or os.environ.get("MPI_LOCALNRANKS")
                or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)
    return max(1, cores // max(local, 1))


def worker_count(setting: int, units: int) -> int:
    """data.workers (0: this rank's cores), never more than there are units."""
    return max(1, min(setting or cores_per_rank(), units))


def _init(counter) -> None:
    global _counter
    _counter = counter
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the cores


def _report(n: int, force: bool = False) -> None:
    global _unreported
    _unreported += n
    if _unreported >= REPORT_BYTES or (force and _unreported):
        with _counter.get_lock():
            _counter.value += _unreported
        _unreported = 0


def _work(task: UnitTask) -> UnitResult:
    result = encode_unit(task, _report)
    _report(0, force=True)
    return result


def run_units(tasks: list[UnitTask], workers: int, update: Callable[[int], None]) -> list[UnitResult]:
    """Tokenize the tasks (on `workers` processes when more than one); results in task order.
    `update(n)` is called with the input bytes read since its last call. A worker's exception
    (a bad record's UserError included) is raised here, and the other workers are ended."""
    if workers <= 1:
        return [encode_unit(t, update) for t in tasks]
    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", 0)
    shown = 0
    with ctx.Pool(workers, initializer=_init, initargs=(counter,)) as pool:
        pending = [pool.apply_async(_work, (t,)) for t in tasks]
        while True:
            done = [job for job in pending if job.ready()]
            for job in done:
                if not job.successful():
                    job.get()  # raises the worker's exception; leaving `with` ends the others
            now = counter.value
            update(now - shown)
            shown = now
            if len(done) == len(pending):
                return [job.get() for job in pending]
            time.sleep(0.25)
