"""Gradient synchronisation between a stage's replicas: the seam the training step calls.

The step asks one object to synchronise and apply gradients:

    sync.synchronize()   wait until every gradient is averaged over the stage's replicas
    sync.step()          update the weights (the optimizer step, on synchronized gradients)
    sync.zero_grad()

`AllReduceSync` is plain data parallelism: Horovod's ring all-reduce inside DistributedOptimizer.
A sharded optimizer (ZeRO-1: reduce-scatter, a shard's update, all-gather) is a second
implementation of the same three calls, not a fork of the step.
"""

from __future__ import annotations

import horovod.torch as hvd
import torch


def compression_for(name: str) -> type:
    """Horovod's compressor for parallel.compression ("none" or "fp16")."""
    return {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}[name]


class AllReduceSync:
    """Average gradients with Horovod's all-reduce, started by hooks during backward.

    Horovod registers a hook per parameter; after `backward_passes` backward passes (one per
    micro-batch) the hook starts an asynchronous ring all-reduce of that gradient while backward
    continues on earlier layers, and `synchronize()` waits for all of them.

    With fp16 compression every gradient is cast to fp16 before the sum. A sum of R fp16 values can
    overflow where each alone does not, so each rank divides by R *before* the all-reduce
    (gradient_predivide_factor = R): the sum is then already the mean and is never larger than the
    largest single gradient.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, compression: str,
                 backward_passes: int, process_set, replicas: int) -> None:
        self.compression, self.replicas = compression, replicas
        self.params = [p for p in model.parameters() if p.requires_grad]
        predivide = float(replicas) if compression == "fp16" and replicas > 1 else 1.0
        # Horovod builds a new optimizer from the param groups: load state after wrapping.
        self.optimizer = hvd.DistributedOptimizer(
            optimizer,
            named_parameters=[(n, p) for n, p in model.named_parameters() if p.requires_grad],
            compression=compression_for(compression),
            backward_passes_per_step=backward_passes,
            op=hvd.Average,
            gradient_predivide_factor=predivide,
            process_set=process_set,
        )

    def synchronize(self) -> None:
        self.optimizer.synchronize()

    def step(self) -> None:
        with self.optimizer.skip_synchronize():  # synchronize() already ran
            self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def bytes_per_step(self) -> dict[str, int | str]:
        """What each rank hands to the collectives per step, counted from what the compressor
        emits (for run_info.json and `hvdllm bench`)."""
        compressed = compression_for(self.compression).compress(torch.zeros(1))[0]
        payload = sum(p.numel() for p in self.params) * compressed.element_size()
        return {"allreduce_payload_bytes": payload if self.replicas > 1 else 0,
                "allreduce_dtype": str(compressed.dtype).replace("torch.", "")}
