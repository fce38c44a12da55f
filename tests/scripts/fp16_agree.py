"""Under mpirun -np 2: fp16 loss scaling takes the same skip decisions on every rank.

Usage: fp16_agree.py JOB [--set k=v ...]. Rank 0 prints one JSON line per rank.
"""
import json
import sys

import horovod.torch as hvd
import torch

from hvdllm.config import load_job
from hvdllm.train import setup, train_step

job_path, *rest = sys.argv[1:]
t = setup(load_job(job_path, [a for a in rest if a != "--set"]), None)
scales = [train_step(t, step)["loss_scale"] for step in range(4)]
checksum = float(sum(p.detach().double().sum() for p in t.model.parameters()))
# A gradient that overflows on one rank only (no all-reduce in between) must still make the
# whole world skip: the scaler reduces its decision over every rank.
for p in t.params:
    p.grad = torch.ones_like(p)
if hvd.rank() == 1:
    t.params[0].grad[0] = float("inf")
local_only = t.scaler.unscale_and_check(t.params)
mine = {"rank": hvd.rank(), "skipped": t.skipped_steps, "scales": scales, "checksum": checksum,
        "local_only_overflow": local_only}
everyone = hvd.allgather_object(mine)
if hvd.rank() == 0:
    print("\n".join(json.dumps(r) for r in everyone), flush=True)
