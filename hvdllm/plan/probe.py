"""Link probe, run on 2 ranks by `hvdllm calibrate`: all-reduce and point-to-point times by size.

    mpirun -np 2 python -m hvdllm.plan.probe OUT.json

Horovod all-reduces float32 tensors (what gradients do) and mpi4py sends raw bytes between the
two ranks (what pipeline messages do), each size warmed up and then timed as a median; rank 0
fits seconds = a + b x bytes to each and writes both links to OUT.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

SIZES = [2**12, 2**16, 2**20, 2**22, 2**24]
"""Bytes per message: 4 KiB (latency-bound) to 16 MiB (bandwidth-bound)."""
REPEATS = 7


def fit(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least squares of seconds = a + b x bytes, a and b kept >= 0."""
    mx, my = statistics.fmean(sizes), statistics.fmean(seconds)
    b = sum((x - mx) * (y - my) for x, y in zip(sizes, seconds)) / sum((x - mx) ** 2 for x in sizes)
    b = max(b, 1e-15)
    return max(my - b * mx, 0.0), b


def timed(fn, repeats: int = REPEATS) -> float:
    fn()  # warm-up (Horovod negotiates a new tensor name once)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def allreduce_times() -> list[float]:
    import horovod.torch as hvd
    import torch

    out = []
    for n in SIZES:
        t = torch.ones(n // 4)
        out.append(timed(lambda: hvd.allreduce(t, name=f"probe{n}", op=hvd.Sum)))
    return out


def p2p_times() -> list[float]:
    """One-way time: half a round trip of the same buffer."""
    import numpy as np
    from mpi4py import MPI

    comm, out = MPI.COMM_WORLD, []
    for n in SIZES:
        buf = np.zeros(n, dtype=np.uint8)

        def round_trip() -> None:
            if comm.rank == 0:
                comm.Send(buf, dest=1)
                comm.Recv(buf, source=1)
            else:
                comm.Recv(buf, source=0)
                comm.Send(buf, dest=0)
        comm.Barrier()
        out.append(timed(round_trip) / 2)
    return out


def main(path: str) -> None:
    import horovod.torch as hvd
    import torch

    torch.set_num_threads(1)
    hvd.init()
    if hvd.size() != 2:
        raise SystemExit("hvdllm.plan.probe runs on exactly 2 ranks")
    reduce_s, p2p_s = allreduce_times(), p2p_times()
    if hvd.rank() == 0:
        a, b = fit(SIZES, reduce_s)
        # A 2-rank ring all-reduce is 2 hops of half the bytes: a = 2 x latency, b = 1 / bandwidth.
        c, d = fit(SIZES, p2p_s)
        result = {"sizes": SIZES, "allreduce_s": reduce_s, "p2p_s": p2p_s,
                  "allreduce": {"latency_s": a / 2, "bytes_per_s": 1 / b},
                  "p2p": {"latency_s": c, "bytes_per_s": 1 / d}}
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
