"""The peer in `hvdllm bench`: the same training step written with torch DistributedDataParallel.

Same model (hvdllm.models.build_model), loss (causal_lm_loss), batches (TokenReader), autocast,
AdamW, learning rate schedule and clipping as `hvdllm train`; only the gradient exchange differs
(DDP buckets over gloo on CPU, NCCL on GPU). Launched by `hvdllm bench` under mpirun, one process per rank:

    mpirun -np 2 python -m hvdllm.bench.ddp_peer JOB.toml OUT.json [--set k=v ...]

The rendezvous is MASTER_ADDR:MASTER_PORT (the bench sets a free port for every launch).

Rank 0 writes {"elapsed_s": [...]} with the wall-clock time after every step.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hvdllm.config import load_job
from hvdllm.data import TokenReader, load_prepared
from hvdllm.layout import job_layout
from hvdllm.models import build_model, causal_lm_loss
from hvdllm.optim import LRSchedule, build_optimizer, clip_gradients, global_grad_norm, set_lr
from hvdllm.precision import autocast


def init_process_group() -> tuple[int, int, torch.device]:
    """Join the DDP world from the MPI launcher's rank variables; returns rank, world, device."""
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", 0)))
    world = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    if cuda:
        local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", 0))
        torch.cuda.set_device(local % torch.cuda.device_count())
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    return rank, world, torch.device("cpu")


def main(argv: list[str]) -> None:
    """Train JOB for training.steps steps under DDP; rank 0 writes the step times to OUT."""
    job_path, out, *rest = argv
    job = load_job(job_path, [a for a in rest if a != "--set"])
    rank, world, device = init_process_group()
    if job.training.threads:
        torch.set_num_threads(job.training.threads)
    data = load_prepared(job)
    reader = TokenReader(data.tokens("train"), job.data.seq_len, job.training.global_batch_size,
                         job.run.seed)
    model = build_model(job.model, data.meta["vocab_size"], job.data.seq_len, job.run.seed).to(device)
    ddp = DistributedDataParallel(model)
    optimizer = build_optimizer(model, job.optim, job.optim.lr)
    schedule = LRSchedule(job.optim, job.optim.lr, job.training.steps)
    layout = job_layout(job, world)
    accumulation, mbs = layout.micro_batches, layout.micro_batch_size
    elapsed, start = [], time.perf_counter()
    for step in range(job.training.steps):
        ddp.train()
        for micro in range(accumulation):
            inputs, targets = reader.micro_batch(step, rank, micro, mbs, world)
            sync = micro == accumulation - 1  # all-reduce only on the last micro-batch
            with ddp.no_sync() if not sync else contextlib.nullcontext():
                with autocast(job.precision.dtype, device):
                    logits = ddp(input_ids=inputs.to(device)).logits
                    loss = causal_lm_loss(logits, targets.to(device))
                (loss / accumulation).backward()
        params = [p for p in model.parameters() if p.grad is not None]
        norm = global_grad_norm(params)
        set_lr(optimizer, schedule(step, norm))
        clip_gradients(params, norm, job.training.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        elapsed.append(time.perf_counter() - start)
    # The largest rank's peak resident memory (Linux reports kB), beside hvdllm's measured peak.
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024], dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # also: every rank is done before any leaves
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"elapsed_s": elapsed, "loss": float(loss), "peak_bytes": int(peak)}, f)
    # Leave without tearing Gloo down: destroy_process_group() hangs now and then (pytorch#75097;
    # a bench launch stalled there after writing its results), and exiting with the group alive
    # can abort in the interpreter's finalisation. The results are written and closed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
