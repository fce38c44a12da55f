"""Data parallelism with Horovod: the distributed optimizer, compression and broadcasts."""

from __future__ import annotations

import horovod.torch as hvd
import torch


def compression_for(name: str) -> type:
    """Horovod's compressor for parallel.compression ("none" or "fp16")."""
    return {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}[name]


def distributed_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                          compression: str, accumulation: int, process_set,
                          group_size: int) -> torch.optim.Optimizer:
    """Wrap an optimizer so that backward() all-reduces (averages) gradients across replicas.

    Horovod registers a hook per parameter; after `accumulation` backward passes the hook starts an
    asynchronous ring all-reduce of that gradient while backward continues on earlier layers, and
    `synchronize()` waits for all of them.

    With fp16 compression every gradient is cast to fp16 before the sum. A sum of R fp16 values can
    overflow where each alone does not, so each rank divides by R *before* the all-reduce
    (gradient_predivide_factor = R): the sum is then already the mean and is never larger than the
    largest single gradient.
    """
    predivide = float(group_size) if compression == "fp16" and group_size > 1 else 1.0
    return hvd.DistributedOptimizer(
        optimizer,
        named_parameters=[(n, p) for n, p in model.named_parameters() if p.requires_grad],
        compression=compression_for(compression),
        backward_passes_per_step=accumulation,
        op=hvd.Average,
        gradient_predivide_factor=predivide,
        process_set=process_set,
    )


def broadcast_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    with_optimizer_state: bool, root_rank: int = 0) -> None:
    """Make every rank start from rank 0's weights (and optimizer state, when it has any)."""
    hvd.broadcast_parameters(model.state_dict(), root_rank=root_rank)
    if with_optimizer_state:
        hvd.broadcast_optimizer_state(optimizer, root_rank=root_rank)
