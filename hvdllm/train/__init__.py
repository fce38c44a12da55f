"""`hvdllm train`: set-up (trainer.py), the step (step.py), checkpoints and resume (resume.py),
the run directory (run_dir.py) and the loop (loop.py)."""

from hvdllm.train.loop import train
from hvdllm.train.step import (
    evaluate,
    forward_backward,
    synchronize_gradients,
    train_step,
    update_weights,
)
from hvdllm.train.trainer import Trainer, setup

__all__ = ["Trainer", "evaluate", "forward_backward", "setup", "synchronize_gradients", "train",
           "train_step", "update_weights"]
