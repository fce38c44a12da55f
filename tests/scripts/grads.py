"""Under mpirun: one forward/backward + Horovod all-reduce through hvdllm's own step code.

Usage: grads.py JOB OUT [--set k=v ...]. Rank 0 saves the averaged gradients to OUT.
"""
import sys

import torch

from hvdllm.config import load_job
from hvdllm.train import forward_backward, setup

job_path, out, *rest = sys.argv[1:]
job = load_job(job_path, [a for a in rest if a != "--set"])
t = setup(job, None)
forward_backward(t, step=0)
t.optimizer.synchronize()  # wait for the averaged gradients
if t.topo.rank == 0:
    torch.save({n: p.grad.clone() for n, p in t.model.named_parameters()}, out)
