"""Data parallelism with Horovod: broadcasts and barriers (gradients: parallel/grad_sync.py).

With pipeline stages each stage's replicas form a Horovod process set; everything here works on
that set (the global set when there is one stage).
"""

from __future__ import annotations

import horovod.torch as hvd
import torch


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
