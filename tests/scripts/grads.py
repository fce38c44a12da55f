"""Under mpirun: one forward/backward + all-reduce through hvdllm's own step code.

Usage: grads.py JOB OUT [--set k=v ...]. The first replica of every stage saves its stage's
averaged gradients (tied embedding summed between first and last stage) to OUT.stage{S}.
"""
import sys

import torch

from hvdllm.config import load_job
from hvdllm.parallel.pipeline import sync_tied_gradient
from hvdllm.train import forward_backward, setup

job_path, out, *rest = sys.argv[1:]
job = load_job(job_path, [a for a in rest if a != "--set"])
t = setup(job, None)
forward_backward(t, step=0)
t.optimizer.synchronize()  # wait for the averaged gradients
sync_tied_gradient(t.stage, t.topo.embed_comm)
if t.topo.replica == 0:
    torch.save({n: p.grad.clone() for n, p in t.model.named_parameters()}, f"{out}.stage{t.topo.stage}")
import horovod.torch as hvd  # noqa: E402

hvd.broadcast_object(0, root_rank=0, name="done")  # nobody leaves while others still reduce
