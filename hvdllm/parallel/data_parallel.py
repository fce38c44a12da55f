"""Data parallelism with Horovod: the distributed optimizer, compression and broadcasts.

With pipeline stages each stage's replicas form a Horovod process set; everything here works on
that set (the global set when there is one stage).
"""

from __future__ import annotations

import horovod.torch as hvd
import torch


def compression_for(name: str) -> type:
    """Horovod's compressor for parallel.compression ("none" or "fp16")."""
    return {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}[name]


def distributed_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                          compression: str, backward_passes: int, process_set,
                          group_size: int) -> torch.optim.Optimizer:
    """Wrap an optimizer so that backward() all-reduces (averages) gradients across replicas.

    Horovod registers a hook per parameter; after `backward_passes` backward passes (one per
    micro-batch) the hook starts an asynchronous ring all-reduce of that gradient while backward
    continues on earlier layers, and `synchronize()` waits for all of them.

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
        backward_passes_per_step=backward_passes,
        op=hvd.Average,
        gradient_predivide_factor=predivide,
        process_set=process_set,
    )


def broadcast_parameters(model: torch.nn.Module, root_rank: int, process_set) -> None:
    """Copy the root's weights and buffers to every replica of the process set (in place).

    (hvd.broadcast_parameters has no process_set argument; this is the same with one.)
    root_rank is a rank of the whole world.
    """
    handles = [hvd.broadcast_async_(t, root_rank, name=f"bcast.{name}", process_set=process_set)
               for name, t in model.state_dict().items()]
    for handle in handles:
        hvd.synchronize(handle)


def barrier() -> None:
    """Wait for every rank (a tiny broadcast; works under MPI and Gloo alike)."""
    hvd.broadcast_object(0, root_rank=0, name="barrier")
