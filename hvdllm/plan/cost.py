"""The cost model: a layout's step time and memory per rank, before launch.

Per stage s and micro-batch (forward + backward):

    t_fb[s]  = FLOPs[s] x flop_s + blocks[s] x layer_s      (+ one forward of checkpointed blocks)
    u[s]     = t_fb[s] + receives[s] x message time         (activations in, gradients back)

A pipeline of P stages and m micro-batches (GPipe and 1F1B alike, not interleaved) takes

    pipeline = (m - 1) x max(u) + sum(u)                    (P = 1: m x u)

and the step adds the exposed gradient exchange of the slowest stage (a ring over its R replicas:
2 (R - 1) hops of bytes / R; ZeRO-1: a reduce-scatter that can overlap the last backward and an
all-gather that cannot), the tied embedding's sum between the end stages, and the optimizer step
(params x param_s, 1/R of it under ZeRO-1). Memory per rank is hvdllm.train.memory's prediction.

Ranks that share cores (CPU nodes with more ranks than cores) cannot all compute at once: the
step is at least the node's total busy time over its cores (`shared_s`, the excess). The terms
are reported separately so that a plan can say why one layout beats another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from hvdllm.config import JobConfig
from hvdllm.errors import UserError
from hvdllm.plan.cluster import Cluster, Link
from hvdllm.plan.space import Candidate

HEADROOM = 0.1
"""Share of each rank's memory a plan leaves free: allocator fragmentation (CUDA's caching
allocator, glibc's arenas) and the model's own error (docs/planning.md)."""

TERMS = ("compute_s", "bubble_s", "messages_s", "exchange_s", "optimizer_s", "fixed_s", "shared_s")
"""The parts of a predicted step, in the order they are shown."""


@dataclass
class Estimate:
    """One layout's prediction."""
    candidate: Candidate
    compute_s: float
    """m x the slowest stage's forward + backward of one micro-batch."""
    bubble_s: float
    """Pipeline fill and drain: the other stages' share of the critical path."""
    messages_s: float
    """Pipeline messages the slowest stage waits for (m of them per neighbour)."""
    exchange_s: float
    """Gradient exchange not hidden behind backward, and the tied embedding's sum."""
    optimizer_s: float
    fixed_s: float
    """The loop's own per-step work (data, loss averaging, logging): measured, or 0 on presets."""
    shared_s: float
    """Extra time because ranks share cores (0 where every rank has its own device)."""
    peak_bytes: int
    """The largest rank's predicted peak memory."""
    fits: bool
    tokens_per_s: float = 0.0
    mfu: float = 0.0

    @property
    def step_s(self) -> float:
        return sum(getattr(self, t) for t in TERMS)


@dataclass(frozen=True)
class StageSizes:
    """What the cost model needs of one stage (from its meta-device model)."""
    flops_per_token: float
    """Training FLOPs per token of the stage: 6 x its matmul weights + its attention term."""
    checkpoint_flops_per_token: float
    """One more forward of every block (2 x block weights + a third of attention): recompute."""
    blocks: int
    params: int
    first: bool
    last: bool


def stage_sizes(stage, seq_len: int) -> StageSizes:
    """FLOPs and counts of a models.Stage (lookup tables excluded: they do no matmul)."""
    config, blocks = stage.model.config, stage.spec.blocks(stage.model)
    block_weights = sum(p.numel() for i in stage.layers for p in blocks[i].parameters()
                        if p.dim() == 2)
    attention = 12.0 * len(stage.layers) * config.hidden_size * seq_len
    head = stage.model.lm_head.weight.numel() if stage.last else 0
    params = sum(p.numel() for p in stage.model.parameters() if p.requires_grad)
    return StageSizes(flops_per_token=6.0 * (block_weights + head) + attention,
                      checkpoint_flops_per_token=2.0 * block_weights + attention / 3,
                      blocks=len(stage.layers), params=params, first=stage.first, last=stage.last)


def model_shape(job: JobConfig) -> str:
    """What a calibration's measured pieces depend on (the block count does not matter)."""
    m = job.model
    return (f"{m.pretrained or m.family} d{m.n_embd} heads {m.n_head}/{m.n_kv_head or m.n_head} "
            f"ffn {m.intermediate_size or 'default'} vocab {job.data.vocab_size} seq "
            f"{job.data.seq_len} {job.precision.dtype} {job.optim.name}")


class CostModel:
    """Predictions for one job on one cluster; stages of each pipeline depth built once."""

    def __init__(self, job: JobConfig, cluster: Cluster, ranks_per_node: int,
                 headroom: float = HEADROOM) -> None:
        self.job, self.cluster, self.ranks_per_node = job, cluster, ranks_per_node
        self.headroom = headroom
        if cluster.calibrated_model and cluster.calibrated_model != model_shape(job):
            raise UserError(f"the cluster file was calibrated on {cluster.calibrated_model}; this "
                            f"job's blocks are {model_shape(job)}: run hvdllm calibrate on this job")
        self._stages = lru_cache(maxsize=None)(self._build_stages)

    def _build_stages(self, stages: int) -> tuple[list, list[StageSizes]]:
        from hvdllm.train.memory import meta_stages

        built = meta_stages(Candidate(stages, 1, 1, 1).apply(self.job), stages)  # balanced cut
        return built, [stage_sizes(s, self.job.data.seq_len) for s in built]

    def threads_per_rank(self) -> int:
        if self.cluster.device == "cuda":
            return 0
        return max(1, self.cluster.devices_per_node // self.ranks_per_node)

    def estimate(self, c: Candidate) -> Estimate:
        from hvdllm.train.memory import predict

        built, sizes = self._stages(c.stages)
        rates = self.cluster.rates_for(self.threads_per_rank())
        tokens = c.micro_batch_size * self.job.data.seq_len
        # One micro-batch per stage: its compute, and the messages it waits for (activations
        # from the stage before, gradients from the stage after).
        fb = [self._forward_backward_s(rates, s, tokens, c.checkpointing != "none") for s in sizes]
        msg = self._message_s(c, tokens)
        waits = [msg * ((not s.first) + (not s.last)) for s in sizes]
        u = [f + w for f, w in zip(fb, waits)]
        # The pipeline's critical path: the slowest stage m - 1 times, every stage once.
        pipeline = c.micro_batches * u[0] if c.stages == 1 else \
            (c.micro_batches - 1) * max(u) + sum(u)
        slowest = max(range(c.stages), key=lambda i: u[i])
        compute = c.micro_batches * fb[slowest]
        messages = c.micro_batches * waits[slowest]
        # After backward: each stage's gradient exchange over its replicas (the slowest counts),
        # the tied embedding's sum, the optimizer step, the loop's own work.
        exchange = max(self._exchange_s(c, s, fb[i]) for i, s in enumerate(sizes))
        exchange += self._tied_s(c, built)
        optimizer = max(s.params for s in sizes) * rates.param_s / (c.replicas if c.zero else 1)
        step = pipeline + exchange + optimizer + rates.step_s
        shared = max(0.0, self._node_busy_s(c, fb, optimizer) - step)
        peak = max(r.predicted_peak for r in predict(c.apply(self.job), c.world,
                                                     self.cluster.device, stages=built))
        est = Estimate(c, compute, pipeline - compute - messages, messages, exchange, optimizer,
                       rates.step_s, shared, peak, fits=peak <= self.memory_per_rank())
        total_flops = sum(s.flops_per_token for s in sizes)
        est.tokens_per_s = self.job.training.global_batch_size * self.job.data.seq_len / est.step_s
        est.mfu = total_flops * est.tokens_per_s / self.peak_flops(c.world)
        return est

    # -- the terms ------------------------------------------------------------------------------
    def _forward_backward_s(self, rates, s: StageSizes, tokens: int, checkpointing: bool) -> float:
        """One micro-batch through a stage: measured pieces, or FLOPs at the preset's rate
        (fp32 jobs at its FP32 rate)."""
        if rates.pieces:
            block = rates.piece_s("block", tokens)
            if checkpointing:  # a recompute is never free: a probe timing it below is noise
                block = max(block, rates.piece_s("block_checkpointed", tokens))
            return (s.blocks * block + (rates.piece_s("embed", tokens) if s.first else 0.0)
                    + (rates.piece_s("head", tokens) if s.last else 0.0))
        slow = self.cluster.fp32_slowdown if self.job.precision.dtype == "fp32" else 1.0
        flops = s.flops_per_token + (s.checkpoint_flops_per_token if checkpointing else 0.0)
        return slow * tokens * rates.flop_s * flops + rates.layer_s * s.blocks

    def _link(self, collective: bool, ranks: list[int]) -> Link:
        """The link a group of ranks talks over: inter-node if they span nodes."""
        inter = len({r // self.ranks_per_node for r in ranks}) > 1
        if collective:
            return self.cluster.allreduce_inter if inter else self.cluster.allreduce_intra
        return self.cluster.p2p_inter if inter else self.cluster.p2p_intra

    def _message_s(self, c: Candidate, tokens: int) -> float:
        """One activation (or its gradient) between neighbouring stages: fp32 hidden states."""
        if c.stages == 1:
            return 0.0
        hidden = self._stages(c.stages)[0][0].model.config.hidden_size
        return self._link(False, [0, 1]).seconds(4 * tokens * hidden)

    def _exchange_s(self, c: Candidate, s: StageSizes, fb_s: float) -> float:
        """A stage's gradient exchange over its replicas, minus what hides behind backward."""
        r = c.replicas
        if r == 1:
            return 0.0
        link = self._link(True, list(range(0, c.world, c.stages)))  # a stage's replicas
        wire = 4 if c.compression == "none" else 2  # fp16 and bf16 both halve it
        hidden = self.cluster.overlap * fb_s * 2 / 3  # the last micro-batch's backward
        if c.zero:
            scatter = (r - 1) * link.seconds(wire * s.params / r)
            gather = (r - 1) * link.seconds(4 * s.params / r)
            return max(0.0, scatter - hidden) + gather
        return max(0.0, 2 * (r - 1) * link.seconds(wire * s.params / r) - hidden)

    def _tied_s(self, c: Candidate, built: list) -> float:
        """The tied embedding's gradient summed between the first and the last stage."""
        weight = built[0].tied_weight
        if c.stages == 1 or weight is None:
            return 0.0
        return 2 * self._link(True, [0, c.stages - 1]).seconds(4 * weight.numel() / 2)

    def _node_busy_s(self, c: Candidate, fb: list[float], optimizer: float) -> float:
        """CPU nodes: the compute of every rank on the busiest node, spread over its cores."""
        if self.cluster.device == "cuda" or self.ranks_per_node <= self.cluster.devices_per_node:
            return 0.0
        on_node = range(min(self.ranks_per_node, c.world))
        busy = sum(c.micro_batches * fb[r % c.stages] + optimizer for r in on_node)
        return busy * self.threads_per_rank() / self.cluster.devices_per_node

    # -- limits -----------------------------------------------------------------------------------
    def memory_per_rank(self) -> float:
        """What a rank's predicted peak may use: its share of the memory less the headroom."""
        share = self.cluster.device_memory_bytes
        if self.cluster.device != "cuda":
            share /= self.ranks_per_node
        return share * (1 - self.headroom)

    def peak_flops(self, world: int) -> float:
        """MFU's denominator: the datasheet (or measured) peak of the devices in use."""
        if self.cluster.device == "cuda":
            return world * self.cluster.peak_tflops * 1e12
        nodes = math.ceil(world / self.ranks_per_node)
        return nodes * self.cluster.devices_per_node * self.cluster.peak_tflops * 1e12
