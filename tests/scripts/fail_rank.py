"""Under mpirun: rank 1 raises at step 3 inside hvdllm train; every rank must end promptly.

Usage: fail_rank.py JOB [hvdllm train args...]. Runs the real CLI with one step made to fail.
"""
import sys

import hvdllm.train.loop
from hvdllm.cli import main
from hvdllm.log import world_rank

real_step = hvdllm.train.loop.train_step


def failing_step(t, step, *args):
    if world_rank() == 1 and step == 3:
        raise RuntimeError("injected failure on rank 1 at step 3")
    return real_step(t, step, *args)


hvdllm.train.loop.train_step = failing_step
sys.exit(main(["train", *sys.argv[1:]]))
