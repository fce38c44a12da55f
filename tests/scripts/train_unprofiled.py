"""Under mpirun: train with profiling, the timeline and labels unreachable; it must not need them.

Usage: train_unprofiled.py JOB [--set k=v ...]. torch.profiler.profile, the span labels for the
profiler and Horovod's start_timeline are replaced by functions that fail: a run with
training.profile and parallel.horovod_timeline off must never call them.
"""
import sys

import horovod.torch as hvd
import torch.profiler

import hvdllm.profile.spans
from hvdllm.config import load_job
from hvdllm.train.loop import train


def forbidden(*args, **kwargs):
    raise AssertionError("a profiler was created with profiling off")


torch.profiler.profile = forbidden
hvdllm.profile.spans._profiler_label = forbidden
hvd.start_timeline = forbidden
job_path, *rest = sys.argv[1:]
train(load_job(job_path, [a for a in rest if a != "--set"]))
