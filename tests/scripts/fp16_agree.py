"""Under mpirun -np 2: fp16 loss scaling takes the same skip decisions on every rank.

Usage: fp16_agree.py JOB OUT [--set k=v ...]. Each rank writes its own JSON to OUT.rank{R}
(several ranks' lines on mpirun's merged stdout can interleave).
"""
import json
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

from hvdllm.config import load_job
from hvdllm.train import setup, train_step

job_path, out, *rest = sys.argv[1:]
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
mine = {"rank": hvd.rank(), "size": hvd.size(), "skipped": t.skipped_steps, "scales": scales,
        "checksum": checksum, "local_only_overflow": local_only}
Path(f"{out}.rank{hvd.rank()}").write_text(json.dumps(mine))
hvd.broadcast_object(0, root_rank=0, name="done")  # nobody leaves while others still reduce
