"""ZeRO-1 over Horovod: each stage's optimizer state split over the stage's R replicas.

Every trainable parameter, flattened and padded to a multiple of R, is cut into R equal parts;
replica r owns part r of each (a "segment"). Per step:

    backward           as soon as a parameter's gradient is complete (its last micro-batch's
                       backward), a hook starts its hvd.reducescatter over the stage's process
                       set: each replica receives the average of its part while backward goes on
                       with earlier layers (Horovod fuses the small ones); fp16 or bf16 on the
                       wire with compression (fp16 pre-divided by R so the sum cannot overflow)
    tie()              a tied embedding/head gradient split over two stages is summed between
                       them first: its reduce-scatter waits for that sum
    step               the optimizer updates only the replica's segments (one tensor per
                       parameter, so weight-decay groups follow the parameter and Adam's step
                       count stays per tensor)
    all-gather         hvd.allgather of the updated parts rebuilds every parameter everywhere,
                       in chunks of GATHER_CHUNK_BYTES (its outputs are not all alive at once)

Without compression the bytes per step equal an all-reduce's (a reduce-scatter plus an
all-gather); with compression only the reduce-scatter is compressed. Optimizer state per
rank is 1/R of plain data parallelism's (up to the padding). Checkpoints hold each replica's
segments with their offsets, so any R, any P and plain data parallelism can load them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import horovod.torch as hvd
import torch
import torch.nn.functional as F

from hvdllm.checkpoint.shards import shard_name
from hvdllm.optim import decays, global_grad_norm
from hvdllm.parallel.compression import wire_bytes, wire_dtype

GATHER_CHUNK_BYTES = 64 * 2**20
"""The all-gather runs in chunks of parameters of about this many gathered bytes: its outputs
(every parameter, fp32) are then never all alive at once (hvdllm/train/memory.py counts one)."""


@dataclass(frozen=True)
class Segment:
    """This replica's part of one parameter."""
    name: str
    param: torch.nn.Parameter
    start: int
    """First element of the part inside the flattened parameter."""
    length: int
    """Elements the replica owns (the last parts are shorter, or empty, where padding is)."""
    per: int
    """Elements per part, padding included: ceil(numel / R)."""


def segment_of(name: str, param: torch.nn.Parameter, replicas: int, replica: int) -> Segment:
    """Part `replica` of R equal parts of the flattened `param`."""
    per = -(-param.numel() // replicas)
    start = min(replica * per, param.numel())
    return Segment(name, param, start, min(per, param.numel() - start), per)


class ZeroSync:
    """The gradient-sync seam (see grad_sync.py) with ZeRO-1's sharded optimizer state."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]],
                 make_optimizer: Callable[[list, list], torch.optim.Optimizer], compression: str,
                 process_set, replicas: int, replica: int, stage: int, backward_passes: int,
                 sum_over_replicas: Callable[[float], float],
                 tied: torch.nn.Parameter | None = None) -> None:
        self.compression, self.replicas, self.process_set = compression, replicas, process_set
        self.sum_over_replicas, self.stage = sum_over_replicas, stage
        self.backward_passes = backward_passes  # per step, one per micro-batch
        self.segments = [segment_of(n, p, replicas, replica)
                         for n, p in named_params if p.requires_grad]
        self.owned = [s for s in self.segments if s.length]
        # What the optimizer updates: views of the replica's parts of the model's own parameters
        # (no second copy; the all-gather then overwrites each part with the same values).
        self.params = [torch.nn.Parameter(s.param.detach().view(-1)[s.start:s.start + s.length])
                       for s in self.owned]
        pairs = list(zip(self.owned, self.params))
        self.optimizer = make_optimizer([q for s, q in pairs if decays(s.param)],
                                        [q for s, q in pairs if not decays(s.param)])
        self.passes: dict[str, int] = {}
        self.handles: dict[str, int] = {}
        for s in self.segments:
            if s.param is not tied:  # (the tied gradient is complete only after tie())
                s.param.register_post_accumulate_grad_hook(self._hook_for(s))

    def _hook_for(self, s: Segment) -> Callable[[torch.Tensor], None]:
        def gradient_accumulated(_: torch.Tensor) -> None:
            self.passes[s.name] = self.passes.get(s.name, 0) + 1
            if self.passes[s.name] == self.backward_passes:  # its last micro-batch
                self._start_reduce_scatter(s)
        return gradient_accumulated

    def _start_reduce_scatter(self, s: Segment) -> None:
        """Distributed: reduce-scatter one gradient over the stage's replicas (asynchronous)."""
        p = s.param
        grad = p.grad.detach().view(-1) if p.grad is not None else p.new_zeros(p.numel())
        pad = s.per * self.replicas - p.numel()
        padded = F.pad(grad, (0, pad)) if pad else grad  # (a copy only where padding is needed)
        name = f"zero.grads.stage{self.stage}.{s.name}"
        if self.compression == "fp16":  # pre-divided: an fp16 sum of R gradients can overflow
            self.handles[s.name] = hvd.reducescatter_async(
                (padded / self.replicas).half(), op=hvd.Sum, name=name,
                process_set=self.process_set)
        elif self.compression == "bf16":  # float32's range: Horovod averages it as it is
            self.handles[s.name] = hvd.reducescatter_async(
                padded.to(torch.bfloat16), op=hvd.Average, name=name,
                process_set=self.process_set)
        else:
            self.handles[s.name] = hvd.reducescatter_async(
                padded, op=hvd.Average, name=name, process_set=self.process_set)

    def _gather_chunks(self) -> list[list[Segment]]:
        """The segments in consecutive groups of at most GATHER_CHUNK_BYTES gathered (a larger
        parameter alone)."""
        chunks: list[list[Segment]] = [[]]
        size = 0
        for s in self.segments:
            gathered = 4 * s.per * self.replicas
            if chunks[-1] and size + gathered > GATHER_CHUNK_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append(s)
            size += gathered
        return chunks

    # -- the seam -------------------------------------------------------------------------------
    def synchronize(self, tie: Callable[[], None] = lambda: None) -> None:
        """Sum tied copies, start what backward did not, and wait: each part gets its average."""
        tie()
        for s in self.segments:  # the tied gradient, and parameters backward never reached
            if s.name not in self.handles:
                self._start_reduce_scatter(s)
        grads = {s.name: hvd.synchronize(self.handles[s.name]) for s in self.segments}
        for s, q in zip(self.owned, self.params):
            q.grad = grads[s.name][:s.length].float()
        self.handles.clear()
        self.passes.clear()

    def grad_norm(self, exclude: torch.nn.Parameter | None,
                  sum_over_stages: Callable[[float], float]) -> float:
        """Global norm: each replica's squares of its parts, summed over replicas and stages."""
        mine = [q for s, q in zip(self.owned, self.params) if s.param is not exclude]
        return global_grad_norm(mine, lambda sq: sum_over_stages(self.sum_over_replicas(sq)))

    def step(self) -> None:
        """Update this replica's parts, then all-gather the parts into every parameter."""
        self.optimizer.step()
        mine = {s.name: q.detach() for s, q in zip(self.owned, self.params)}
        with torch.no_grad():
            for chunk in self._gather_chunks():  # a chunk's all-gathers started, then waited for
                handles = [hvd.allgather_async(self._padded_part(s, mine),
                                               name=f"zero.params.stage{self.stage}.{s.name}",
                                               process_set=self.process_set) for s in chunk]
                for s, handle in zip(chunk, handles):
                    full = hvd.synchronize(handle)
                    s.param.copy_(full[:s.param.numel()].view_as(s.param))

    @staticmethod
    def _padded_part(s: Segment, mine: dict[str, torch.Tensor]) -> torch.Tensor:
        part = s.param.new_zeros(s.per)
        if s.length:
            part[:s.length] = mine[s.name]
        return part

    def zero_grad(self) -> None:
        for s in self.segments:
            s.param.grad = None
        for q in self.params:
            q.grad = None

    def bytes_per_step(self) -> dict[str, int | str]:
        wire = wire_bytes(self.compression)
        padded = sum(s.per for s in self.segments) * self.replicas
        return {"allreduce_payload_bytes": 0, "allreduce_dtype": "none",
                "reducescatter_payload_bytes": padded * wire if self.replicas > 1 else 0,
                "allgather_payload_bytes": padded * 4 if self.replicas > 1 else 0,
                "reducescatter_dtype": str(wire_dtype(self.compression)).replace("torch.", "")}

    # -- checkpoints ----------------------------------------------------------------------------
    def optimizer_shards(self, stage: int, replica: int) -> dict[str, dict]:
        """Every replica writes its own parts of the state, by parameter name, each entry
        marked with its segment (start and length within the flattened parameter)."""
        out = {}
        for s, q in zip(self.owned, self.params):
            state = dict(self.optimizer.state.get(q, {}))
            out[s.name] = {"zero_segment": [s.start, s.length], **state}
        return {shard_name("optim", stage, replica): out}

    def load_optimizer_state(self, full: dict[str, dict], aliases: dict[str, str]) -> None:
        """Take this replica's parts of full per-parameter state (see checkpoint.state)."""
        for s, q in zip(self.owned, self.params):
            key = s.name if s.name in full else aliases.get(s.name, s.name)
            if key not in full:
                continue
            self.optimizer.state[q] = {
                k: v.flatten()[s.start:s.start + s.length].clone() if torch.is_tensor(v) and v.dim()
                else (v.clone() if torch.is_tensor(v) else v) for k, v in full[key].items()}
