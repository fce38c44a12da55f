"""Running a schedule on one stage: micro-batch forwards/backwards and the messages between stages.

Activations travel forward and their gradients backward between neighbouring stages of a
replica over the pipeline communicator (mpi4py point-to-point). Each message is a small header
(dtype and shape) and the tensor's raw bytes, so every dtype - bf16 included - arrives bit-exact.
On GPUs the bytes go from device memory when MPI is CUDA-aware, else through pinned host buffers
(parallel/device_messages.py).
Sends are non-blocking (Isend, completed at the end of the step); receives block, under the
watchdog (parallel/watchdog.py), which ends the job with a message naming the stage, replica and
step if a neighbour stops answering.

With one stage (P = 1) nothing is sent and the 1F1B schedule is plain gradient accumulation.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from hvdllm.models import Stage, causal_lm_loss
from hvdllm.parallel.device_messages import MessageBuffers
from hvdllm.parallel.schedules import SCHEDULES
from hvdllm.profile.spans import StepSpans

ACT_TAG, GRAD_TAG = 11, 22
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
Batch = tuple[torch.Tensor, torch.Tensor]


class PointToPoint:
    """Dtype-exact tensor messages to the previous/next stage on the pipeline communicator."""

    def __init__(self, comm, waiting: Callable[[str], contextlib.AbstractContextManager],
                 device: torch.device = torch.device("cpu")) -> None:
        self.comm, self.waiting = comm, waiting  # waiting: the watchdog guard
        self.buffers = MessageBuffers(device)  # host memory, GPU memory or pinned staging
        self.pending: list = []  # (request, buffers) of sends in flight
        self.wait_s = 0.0  # time spent blocked in receives (the measured bubble)
        self.spans: StepSpans | None = None  # the training step's spans (None in evaluation)

    def send(self, tensor: torch.Tensor, dest_stage: int, tag: int) -> None:
        header = np.array([_DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape],
                          dtype=np.int64)
        payload, keep = self.buffers.outgoing(tensor)
        from mpi4py import MPI

        reqs = [self.comm.Isend([header, MPI.INT64_T], dest=dest_stage, tag=tag),
                self.comm.Isend([payload, MPI.BYTE], dest=dest_stage, tag=tag + 1)]
        self.pending.append((reqs, (header, payload, keep)))

    def recv(self, src_stage: int, tag: int, what: str, micro: int = -1) -> torch.Tensor:
        """The next message from a neighbour, on this stage's device."""
        from mpi4py import MPI

        start = time.perf_counter()
        with self.waiting(f"{what} from stage {src_stage}"):
            header = np.zeros(8, dtype=np.int64)
            self.comm.Recv([header, MPI.INT64_T], source=src_stage, tag=tag)
            dtype, shape = _DTYPES[header[0]], [int(d) for d in header[2:2 + header[1]]]
            into, out = self.buffers.incoming(shape, dtype)
            self.comm.Recv([into, MPI.BYTE], source=src_stage, tag=tag + 1)
        end = time.perf_counter()
        self.wait_s += end - start
        if self.spans is not None:  # the same two readings: chart and bubble agree
            self.spans.add("recv", micro, start, end)
        return self.buffers.arrived(out)

    def finish_sends(self) -> None:
        from mpi4py import MPI

        start = time.perf_counter()
        with self.waiting("the neighbours to receive this step's messages"):
            for reqs, _buffers in self.pending:
                MPI.Request.Waitall(reqs)
        self.pending.clear()
        if self.spans is not None:
            self.spans.add("send", -1, start, time.perf_counter())


@dataclass
class StepResult:
    loss: torch.Tensor
    """Mean loss over the micro-batches (last stage; zero elsewhere)."""
    wait_s: float
    """Seconds this stage spent waiting for its neighbours."""
    peak_live: int
    """Most micro-batches whose activations were held at once."""
    extras: dict = field(default_factory=dict)


class PipelineRunner:
    """Executes one stage's schedule for a training step, or forwards only for evaluation."""

    def __init__(self, stage: Stage, stage_index: int, stages: int, schedule: str,
                 micro_batches: int, p2p: PointToPoint | None, device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager],
                 scale_loss: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.stage, self.s, self.P = stage, stage_index, stages
        self.actions = SCHEDULES[schedule](stages, stage_index, micro_batches)
        self.m, self.p2p, self.device = micro_batches, p2p, device
        self.autocast, self.scale_loss = autocast, scale_loss

    def _input(self, i: int, get_batch: Callable[[int], Batch], step: int) -> torch.Tensor:
        if self.stage.first:
            return get_batch(i)[0].to(self.device)
        x = self.p2p.recv(self.s - 1, ACT_TAG, f"activations of micro-batch {i}", micro=i)
        return x.requires_grad_()

    def _forward(self, i: int, get_batch: Callable[[int], Batch], step: int, spans: StepSpans):
        x = self._input(i, get_batch, step)
        with spans.span("forward", i), self.autocast():
            out = self.stage.forward(x)
            if self.stage.last:
                targets = get_batch(i)[1].to(self.device)
                out = causal_lm_loss(out, targets)
        if not self.stage.last:
            self.p2p.send(out, self.s + 1, ACT_TAG)
        return x, out

    def _backward(self, i: int, x: torch.Tensor, out: torch.Tensor, step: int,
                  spans: StepSpans) -> None:
        if self.stage.last:
            with spans.span("backward", i):
                self.scale_loss(out / self.m).backward()
        else:
            grad = self.p2p.recv(self.s + 1, GRAD_TAG, f"gradients of micro-batch {i}", micro=i)
            with spans.span("backward", i):
                out.backward(grad.to(out.dtype))
        if not self.stage.first:
            self.p2p.send(x.grad, self.s - 1, GRAD_TAG)

    def train_step(self, get_batch: Callable[[int], Batch], step: int,
                   spans: StepSpans) -> StepResult:
        """Run the schedule: forwards and backwards in order, messages implied by the stage;
        each action is recorded in `spans`."""
        live: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        loss_sum, peak = torch.zeros((), device=self.device), 0
        if self.p2p:
            self.p2p.wait_s, self.p2p.spans = 0.0, spans
        for kind, i in self.actions:
            if kind == "F":
                live[i] = self._forward(i, get_batch, step, spans)
                peak = max(peak, len(live))
                if self.stage.last:
                    loss_sum += live[i][1].detach()
            else:
                self._backward(i, *live.pop(i), step, spans)
        if self.p2p:
            self.p2p.finish_sends()
            self.p2p.spans = None
        return StepResult(loss=loss_sum / self.m, wait_s=self.p2p.wait_s if self.p2p else 0.0,
                          peak_live=peak)

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> tuple[float, int]:
        """Forward the batches through the pipeline; (sum of losses x windows, windows) on the
        last stage, (0, 0) elsewhere."""
        total, count = 0.0, 0
        for i, (inputs, targets) in enumerate(batches):
            x = inputs.to(self.device) if self.stage.first else \
                self.p2p.recv(self.s - 1, ACT_TAG, f"evaluation activations {i}")
            with self.autocast():
                out = self.stage.forward(x)
                if self.stage.last:
                    loss = causal_lm_loss(out, targets.to(self.device))
                    total, count = total + float(loss) * len(inputs), count + len(inputs)
            if not self.stage.last:
                self.p2p.send(out, self.s + 1, ACT_TAG)
        if self.p2p:
            self.p2p.finish_sends()
        return total, count


def sync_tied_gradient(stage: Stage, embed_set) -> None:
    """Sum the tied embedding/head gradient between the first and last stage of a replica.

    In one process that weight's gradient is the sum of what the embedding lookup and the output
    head contribute; split over stages each copy sees one part. After the sum both copies hold
    the full gradient, take identical optimizer steps, and stay identical.
    """
    weight = stage.tied_weight
    if weight is None or embed_set is None:
        return
    import horovod.torch as hvd

    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    # Distributed: a two-rank all-reduce over the replica's end stages, in place and where the
    # gradient lives (Horovod's process set: NCCL on GPUs, MPI on CPUs; a + b is exact in
    # either order, so both copies stay bit-identical).
    hvd.allreduce_(weight.grad, op=hvd.Sum, name="tied_embedding.grad", process_set=embed_set)
