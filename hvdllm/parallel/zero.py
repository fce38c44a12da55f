"""ZeRO-1 over Horovod: each stage's optimizer state split over the stage's R replicas.

The stage's trainable parameters are laid end to end in one flat fp32 vector (by name order),
padded to a multiple of R; replica r owns the r-th of R equal slices. Per step:

    tie()              a tied embedding/head gradient is summed between the end stages first
                       (their flat vectors differ, so their shards would not line up after)
    reduce-scatter     hvd.reducescatter of the flat gradient over the stage's process set:
                       each replica receives the average of its slice (fp16 on the wire with
                       compression, pre-divided by R so the sum cannot overflow)
    step               the optimizer updates only the replica's slice ("segments": the part
                       of each parameter inside the slice, one tensor each, so weight-decay
                       groups follow the parameter and Adam's step count stays per tensor)
    all-gather         hvd.allgather of the updated slices rebuilds every parameter everywhere

Without compression the bytes per step equal an all-reduce's (a reduce-scatter plus an
all-gather); with fp16 compression only the reduce-scatter is compressed. Optimizer state per
rank is 1/R of plain data parallelism's (up to the padding). Checkpoints hold each replica's
segments with their offsets, so any R, any P and plain data parallelism can load them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import horovod.torch as hvd
import torch

from hvdllm.checkpoint.shards import shard_name
from hvdllm.optim import decays, global_grad_norm


@dataclass(frozen=True)
class Segment:
    """The part of one parameter inside this replica's slice of the flat vector."""
    name: str
    param: torch.nn.Parameter
    start: int
    """First element of the parameter (flattened) inside the slice."""
    length: int
    offset: int
    """Where it starts inside the slice."""


def flat_slices(sizes: list[int], replicas: int) -> tuple[int, int]:
    """(padded length, slice length) of a flat vector of `sizes` split into `replicas` slices."""
    total = sum(sizes)
    per = -(-total // replicas)
    return per * replicas, per


def segments_of(named: list[tuple[str, torch.nn.Parameter]], lo: int, hi: int) -> list[Segment]:
    """The segments of the parameters that overlap the flat range [lo, hi)."""
    out, offset = [], 0
    for name, p in named:
        a, b = max(lo, offset), min(hi, offset + p.numel())
        if a < b:
            out.append(Segment(name, p, a - offset, b - a, a - lo))
        offset += p.numel()
    return out


class ZeroSync:
    """The gradient-sync seam (see grad_sync.py) with ZeRO-1's sharded optimizer state."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]],
                 make_optimizer: Callable[[list, list], torch.optim.Optimizer], compression: str,
                 process_set, replicas: int, replica: int, stage: int,
                 sum_over_replicas: Callable[[float], float]) -> None:
        self.named = [(n, p) for n, p in named_params if p.requires_grad]
        self.compression, self.replicas, self.process_set = compression, replicas, process_set
        self.sum_over_replicas = sum_over_replicas
        # Collective names are unique per stage: each stage's process set runs the same three
        # collectives at the same time, and Horovod must never match one stage's with another's.
        self.names = {op: f"zero.{op}.stage{stage}" for op in ("grads", "params")}
        self.padded, self.per = flat_slices([p.numel() for _, p in self.named], replicas)
        self.segments = segments_of(self.named, replica * self.per, (replica + 1) * self.per)
        # The replica's own fp32 copy of its slice: what the optimizer updates.
        self.params = [torch.nn.Parameter(s.param.detach().flatten()[s.start:s.start + s.length]
                                          .clone()) for s in self.segments]
        pairs = list(zip(self.segments, self.params))
        self.optimizer = make_optimizer([q for s, q in pairs if decays(s.param)],
                                        [q for s, q in pairs if not decays(s.param)])

    # -- the seam -------------------------------------------------------------------------------
    def synchronize(self, tie: Callable[[], None] = lambda: None) -> None:
        """Sum tied copies, then reduce-scatter: each segment gets its averaged gradient."""
        tie()
        with torch.no_grad():  # the slice as the model holds it now (after a broadcast or load)
            for s, q in zip(self.segments, self.params):
                q.copy_(s.param.detach().flatten()[s.start:s.start + s.length])
        grads = [p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), device=p.device)
                 for _, p in self.named]
        flat = torch.cat(grads + [grads[0].new_zeros(self.padded - sum(g.numel() for g in grads))])
        if self.compression == "fp16":
            mine = hvd.reducescatter((flat / self.replicas).half(), op=hvd.Sum,
                                     name=self.names["grads"], process_set=self.process_set).float()
        else:
            mine = hvd.reducescatter(flat, op=hvd.Average, name=self.names["grads"],
                                     process_set=self.process_set)
        for s, q in zip(self.segments, self.params):
            q.grad = mine[s.offset:s.offset + s.length].clone()

    def grad_norm(self, exclude: torch.nn.Parameter | None,
                  sum_over_stages: Callable[[float], float]) -> float:
        """Global norm: each replica's squares of its slice, summed over replicas and stages."""
        mine = [q for s, q in zip(self.segments, self.params) if s.param is not exclude]
        return global_grad_norm(mine, lambda sq: sum_over_stages(self.sum_over_replicas(sq)))

    def step(self) -> None:
        """Update this replica's slice, then all-gather the slices into every parameter."""
        self.optimizer.step()
        with torch.no_grad():
            mine = torch.zeros(self.per, device=self.params[0].device if self.params else "cpu")
            for s, q in zip(self.segments, self.params):
                mine[s.offset:s.offset + s.length] = q
            full = hvd.allgather(mine, name=self.names["params"], process_set=self.process_set)
            offset = 0
            for _, p in self.named:
                p.copy_(full[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def zero_grad(self) -> None:
        for _, p in self.named:
            p.grad = None
        for q in self.params:
            q.grad = None

    def bytes_per_step(self) -> dict[str, int | str]:
        wire = 2 if self.compression == "fp16" else 4
        return {"allreduce_payload_bytes": 0, "allreduce_dtype": "none",
                "reducescatter_payload_bytes": self.padded * wire if self.replicas > 1 else 0,
                "allgather_payload_bytes": self.padded * 4 if self.replicas > 1 else 0,
                "reducescatter_dtype": "float16" if wire == 2 else "float32"}

    # -- checkpoints ----------------------------------------------------------------------------
    def optimizer_shards(self, stage: int, replica: int) -> dict[str, dict]:
        """Every replica writes its own slice of the state, by parameter name, each entry
        marked with its segment (start and length within the flattened parameter)."""
        out = {}
        for s, q in zip(self.segments, self.params):
            state = dict(self.optimizer.state.get(q, {}))
            out[s.name] = {"zero_segment": [s.start, s.length], **state}
        return {shard_name("optim", stage, replica): out}

    def load_optimizer_state(self, full: dict[str, dict], aliases: dict[str, str]) -> None:
        """Take this replica's slices of full per-parameter state (see checkpoint.state)."""
        for s, q in zip(self.segments, self.params):
            key = s.name if s.name in full else aliases.get(s.name, s.name)
            if key not in full:
                continue
            self.optimizer.state[q] = {
                k: v.flatten()[s.start:s.start + s.length].clone() if torch.is_tensor(v) and v.dim()
                else (v.clone() if torch.is_tensor(v) else v) for k, v in full[key].items()}
