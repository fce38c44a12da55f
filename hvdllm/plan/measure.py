"""Compute probe, run by `hvdllm calibrate` on every core group of the node at once:

    mpirun -np RANKS python -m hvdllm.plan.measure JOB OUT.json THREADS [--set K=V ...]

Each rank (THREADS threads) builds three one-block stages of the job's model - the first (with
the embedding), a middle one and the last (with the head and the loss) - and times forward +
backward of each, as training runs them (autocast, activation checkpointing on and off), at
micro-batches of 1, 2, 4, ... sequences, and an optimizer step (gradient clipping included) over
their parameters. All ranks time together (a barrier before each piece), so a rank's numbers
include what its neighbours' work costs it (memory bandwidth, caches). Rank 0 writes

    block, block_checkpointed, embed (first - block), head (last - block): [[tokens, s], ...]
    param_s: optimizer seconds per parameter
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

REPS = 5


def piece_stage(config, spec_seed: int, layers: range, first: bool, last: bool):
    """A one-block Stage with real weights, in training mode."""
    from hvdllm.models import Stage, empty_model
    from hvdllm.models.init import init_parameters, materialize

    stage = Stage(empty_model(config), layers, first, last)
    materialize(stage.model, stage.spec)
    init_parameters(stage.model, stage.spec, spec_seed)
    stage.model.train()
    return stage


def forward_backward(stage, mbs: int, seq_len: int, autocast) -> None:
    from hvdllm.models import causal_lm_loss

    vocab, d = stage.model.config.vocab_size, stage.model.config.hidden_size
    x = torch.randint(0, vocab, (mbs, seq_len)) if stage.first else \
        torch.randn(mbs, seq_len, d, requires_grad=True)
    with autocast():
        out = stage.forward(x)
        if stage.last:
            out = causal_lm_loss(out, torch.randint(0, vocab, (mbs, seq_len)))
    out.backward() if stage.last else out.backward(torch.randn_like(out))
    stage.model.zero_grad(set_to_none=True)


def timed(fn, comm) -> float:
    """Median seconds of fn after a warm-up, every rank timing at the same moment."""
    fn()
    times = []
    for _ in range(REPS):
        comm.Barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def micro_batch_sizes(global_batch: int, limit: int = 16) -> list[int]:
    sizes, b = [], 1
    while b <= min(global_batch, limit):
        sizes.append(b)
        b *= 2
    return sizes


def measure(job, comm) -> dict:
    from hvdllm.models import model_config
    from hvdllm.optim import build_optimizer, clip_gradients, global_grad_norm
    from hvdllm.precision import autocast
    from hvdllm.train.memory import job_vocab_size

    config = model_config(job.model, job_vocab_size(job), job.data.seq_len)
    n, seq = config.num_hidden_layers, job.data.seq_len
    first = piece_stage(config, job.run.seed, range(0, 1), True, False)
    middle = piece_stage(config, job.run.seed, range(1, 2), False, False)
    last = piece_stage(config, job.run.seed, range(n - 1, n), False, True)
    cast = lambda: autocast(job.precision.dtype, torch.device("cpu"))  # noqa: E731
    pieces: dict[str, list[list[float]]] = {"block": [], "block_checkpointed": [], "embed": [], "head": []}
    for mbs in micro_batch_sizes(job.training.global_batch_size):
        t = {name: timed(lambda s=s: forward_backward(s, mbs, seq, cast), comm)
             for name, s in (("first", first), ("middle", middle), ("last", last))}
        middle.checkpointed = frozenset(middle.layers)
        t["ckpt"] = timed(lambda: forward_backward(middle, mbs, seq, cast), comm)
        middle.checkpointed = frozenset()
        tokens = mbs * seq
        pieces["block"].append([tokens, t["middle"]])
        pieces["block_checkpointed"].append([tokens, t["ckpt"]])
        pieces["embed"].append([tokens, max(t["first"] - t["middle"], 0.0)])
        pieces["head"].append([tokens, max(t["last"] - t["middle"], 0.0)])
    params = [p for s in (first, middle, last) for p in s.model.parameters()]
    model = torch.nn.ParameterList(params)
    optimizer = build_optimizer(model, job.optim, job.optim.lr)

    def step() -> None:
        for p in params:
            p.grad = torch.ones_like(p)
        clip_gradients(params, global_grad_norm(params), job.training.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    param_s = timed(step, comm) / sum(p.numel() for p in params)
    return {"pieces": pieces, "param_s": param_s}


def main() -> None:
    from mpi4py import MPI

    from hvdllm.config import load_job

    ap = argparse.ArgumentParser()
    ap.add_argument("job")
    ap.add_argument("out")
    ap.add_argument("threads", type=int)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = measure(load_job(args.job, args.sets), MPI.COMM_WORLD)
    if MPI.COMM_WORLD.rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
