"""Gradient synchronisation between a stage's replicas: the seam the training step calls.

The step asks one object to synchronise and apply gradients:

    sync.synchronize(tie)   gradients averaged over the stage's replicas, tied copies summed
    sync.params             the tensors whose gradients the step unscales and clips
    sync.grad_norm(...)     the global gradient norm
    sync.step()             update the weights (the optimizer step, on synchronized gradients)
    sync.zero_grad()
    sync.optimizer_shards / load_optimizer_state    its part of a checkpoint

`AllReduceSync` is plain data parallelism: Horovod's ring all-reduce inside DistributedOptimizer.
`ZeroSync` (zero.py) shards the optimizer state: reduce-scatter, a slice's update, all-gather;
the same calls, not a fork of the step.
"""

from __future__ import annotations

from typing import Callable

import horovod.torch as hvd
import torch

from hvdllm.checkpoint.shards import shard_name
from hvdllm.checkpoint.state import load_named_optimizer_state, named_optimizer_state
from hvdllm.optim import global_grad_norm
from hvdllm.parallel.compression import compressor, predivide_factor


class AllReduceSync:
    """Average gradients with Horovod's all-reduce, started by hooks during backward.

    Horovod registers a hook per parameter; after `backward_passes` backward passes (one per
    micro-batch) the hook starts an asynchronous ring all-reduce of that gradient while backward
    continues on earlier layers, and `synchronize()` waits for all of them.

    With compression every gradient is cast to fp16 or bf16 before the sum (compression.py). A sum
    of R fp16 values can overflow where each alone does not, so with fp16 each rank divides by R
    *before* the all-reduce (gradient_predivide_factor = R): the sum is then already the mean and
    is never larger than the largest single gradient. bf16 has float32's range: no pre-divide.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, compression: str,
                 backward_passes: int, process_set, replicas: int) -> None:
        self.compression, self.replicas = compression, replicas
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        # Horovod builds a new optimizer from the param groups: load state after wrapping.
        self.optimizer = hvd.DistributedOptimizer(
            optimizer,
            named_parameters=self.named,
            compression=compressor(compression),
            backward_passes_per_step=backward_passes,
            op=hvd.Average,
            gradient_predivide_factor=predivide_factor(compression, replicas),
            process_set=process_set,
        )

    def reshape(self, backward_passes: int, replicas: int) -> None:
        """A new world size (elastic mode): micro-batches per step and the fp16 pre-divide."""
        self.replicas = replicas
        self.optimizer.set_backward_passes_per_step(backward_passes)
        self.optimizer.gradient_predivide_factor = predivide_factor(self.compression, replicas)

    def synchronize(self, tie: Callable[[], None] = lambda: None) -> None:
        """Wait for the all-reduces started during backward, then sum the tied copies."""
        self.optimizer.synchronize()
        tie()

    def grad_norm(self, exclude: torch.nn.Parameter | None,
                  sum_over_stages: Callable[[float], float]) -> float:
        """Every replica holds the averaged gradients: squares summed over the stages only."""
        return global_grad_norm([p for p in self.params if p is not exclude], sum_over_stages)

    def step(self) -> None:
        with self.optimizer.skip_synchronize():  # synchronize() already ran
            self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def optimizer_shards(self, stage: int, replica: int) -> dict[str, dict]:
        """The stage's first replica writes the state (every replica holds the same)."""
        if replica:
            return {}
        return {shard_name("optim", stage): named_optimizer_state(self.optimizer, self.named)}

    def load_optimizer_state(self, full: dict[str, dict], aliases: dict[str, str]) -> None:
        load_named_optimizer_state(self.optimizer, self.named, full, aliases)

    def bytes_per_step(self) -> dict[str, int | str]:
        """What each rank hands to the collectives per step, counted from what the compressor
        emits (for run_info.json and `hvdllm bench`)."""
        compressed = compressor(self.compression).compress(torch.zeros(1))[0]
        payload = sum(p.numel() for p in self.params) * compressed.element_size()
        return {"allreduce_payload_bytes": payload if self.replicas > 1 else 0,
                "allreduce_dtype": str(compressed.dtype).replace("torch.", "")}
