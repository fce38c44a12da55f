"""Under mpirun: one step's gradients through hvdllm's own step code, saved before the update.

Usage: grads.py JOB OUT [--set k=v ...]. Runs the real set-up, forward/backward and gradient
synchronisation (all-reduce over replicas, tied-weight sum between end stages, unscale) of
hvdllm.train.step; the first replica of every stage saves its stage's gradients to OUT.stage{S}.
"""
import sys

import torch

from hvdllm.config import load_job
from hvdllm.profile.spans import StepSpans
from hvdllm.train import forward_backward, setup, synchronize_gradients

job_path, out, *rest = sys.argv[1:]
job = load_job(job_path, [a for a in rest if a != "--set"])
t = setup(job, None)
forward_backward(t, 0, StepSpans())
assert not synchronize_gradients(t)  # no overflow in fp32
if t.topo.replica == 0:
    torch.save({n: p.grad.clone() for n, p in t.model.named_parameters()}, f"{out}.stage{t.topo.stage}")
import horovod.torch as hvd  # noqa: E402

hvd.broadcast_object(0, root_rank=0, name="done")  # nobody leaves while others still reduce
