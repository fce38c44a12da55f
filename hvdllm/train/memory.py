"""Memory per rank: exact state counts, activations (measured or estimated) and the peak.

    peak = fixed + parameters + gradients + optimizer state + activations + backward transient

- parameters, gradients: the stage's parameters (fp32 master weights, fp32 gradients);
- optimizer state: what the optimizer holds after its first step, by kind (AdamW/Adam: two
  moments per parameter and a 4-byte step per tensor; Adagrad: a sum and a step; SGD: a
  momentum buffer when momentum > 0). ZeRO-1 keeps one part of it: 1/R of each parameter's
  elementwise state (up to padding) and a step per part (`zero_optimizer_bytes`);
- activations: one micro-batch's saved tensors (autocast's bf16 weight copies included, they are
  kept per micro-batch) x the micro-batches in flight (1F1B: min(P - stage, m); GPipe: m).
  A run measures one micro-batch with models/activations.SavedActivations; `hvdllm memory`
  estimates it per family from the sizes (`block_bytes_per_token`, calibrated on that counter);
- transient: the backward's working set of one micro-batch (a block's activation gradients,
  the logits' gradient on the last stage, one recomputed block under checkpointing); with ZeRO-1
  also its gradient parts and one chunk of all-gather outputs (`zero_exchange_bytes`);
- fixed: imports, the MPI/Horovod runtime and its buffers (FIXED_CPU_BYTES, measured here).
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hvdllm.config import JobConfig, OptimConfig

FIXED_CPU_BYTES = 400 * 2**20
"""Resident memory of a rank that owns no model: Python, torch, transformers, Horovod and
OpenMPI loaded and initialised, the data reader (measured here: start-up peak minus parameters
minus one micro-batch's activations, 387-407 MB over the ranks of 1- and 2-stage runs)."""
WRITER_CPU_BYTES = 120 * 2**20
"""Rank 0's extra: the metrics and TensorBoard writers (measured: rank 0 peaks 120-170 MB above
rank 1 of the same stage)."""
FUSION_BYTES = 128 * 2**20
"""Horovod's fusion buffer (HOROVOD_FUSION_THRESHOLD's default); only the part a step's
gradients fill is touched."""
FIXED_GPU_BYTES = 1536 * 2**20
"""Per-GPU memory outside the model (CUDA context, cuBLAS workspace, NCCL and Horovod's 128 MiB
fusion buffer): an allowance, not measured here (no GPU in this workplace)."""
MIB = 2**20


@dataclass
class RankMemory:
    """The bytes of one rank (or the prediction for one stage)."""
    stage: int
    parameters: int
    gradients: int
    optimizer: int
    activations_per_micro_batch: int
    weight_copies_per_micro_batch: int
    in_flight: int
    activations: int
    transient: int
    fixed: int
    predicted_peak: int
    measured_peak: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


# -- exact counts ---------------------------------------------------------------------------------
def tensor_bytes(tensors) -> int:
    """Bytes of the tensors' elements."""
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(params: list[torch.Tensor], cfg: OptimConfig) -> int:
    """Bytes the optimizer holds after its first step, from its kind."""
    full = tensor_bytes(params)
    steps = 4 * len(params)  # a float32 step count per parameter tensor
    if cfg.name in ("adamw", "adam"):
        per_rank, scalars = 2 * full, steps
    elif cfg.name == "adagrad":
        per_rank, scalars = full, steps
    else:
        per_rank, scalars = (full if cfg.momentum > 0 else 0), 0
    return per_rank + scalars


def zero_optimizer_bytes(params: list[torch.Tensor], cfg: OptimConfig, replicas: int) -> int:
    """ZeRO-1 (parallel/zero.py): replica 0's part of each parameter (ceil(numel / R) elements,
    the largest part) of the elementwise state, plus a step scalar per part."""
    elements = sum(-(-p.numel() // replicas) for p in params)
    return _slice_state(elements, sum(1 for p in params if p.numel()), cfg)


def zero_exchange_bytes(params: list[torch.Tensor], replicas: int) -> int:
    """ZeRO-1's buffers besides its optimizer state: the reduce-scatter's outputs (replica 0's
    fp32 gradient parts, which the optimizer steps on) and one chunk of all-gather outputs
    (parallel/zero.py GATHER_CHUNK_BYTES, or the largest parameter if that is larger)."""
    from hvdllm.parallel.zero import GATHER_CHUNK_BYTES

    parts = [-(-p.numel() // replicas) for p in params]
    gathered = [4 * n * replicas for n in parts]
    return 4 * sum(parts) + min(sum(gathered), max([GATHER_CHUNK_BYTES, *gathered]))


def _slice_state(elements: int, parts: int, cfg: OptimConfig) -> int:
    """State bytes of a ZeRO slice of `elements` fp32 values held as `parts` tensors."""
    kinds = {"adamw": 2, "adam": 2, "adagrad": 1}.get(cfg.name, 1 if cfg.momentum > 0 else 0)
    scalars = 4 * parts if cfg.name in ("adamw", "adam", "adagrad") else 0
    return 4 * elements * kinds + scalars


def counted_optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state, as it holds them now."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if isinstance(v, torch.Tensor))


def in_flight(schedule: str, stages: int, stage: int, micro_batches: int) -> int:
    """Micro-batches whose activations a stage holds at once (parallel/schedules.py)."""
    if schedule == "gpipe":
        return micro_batches
    return min(stages - stage, micro_batches)


# -- measured -------------------------------------------------------------------------------------
def measured_peak(device: torch.device) -> int:
    """CUDA's max allocated bytes on a GPU; on the CPU the process's peak resident memory."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return _process_status_bytes("VmHWM")


def measured_now(device: torch.device) -> int:
    """What the rank holds now: CUDA's allocated bytes, or the process's resident memory."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return _process_status_bytes("VmRSS")


def _process_status_bytes(field: str) -> int:
    """A kB field of /proc/self/status (VmHWM: peak resident, VmRSS: resident now), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def measure_activations(stage, device: torch.device, autocast, micro_batch_size: int,
                        seq_len: int, vocab_size: int) -> int:
    """Saved bytes of one training forward of the stage on a synthetic micro-batch (no messages,
    no backward; the RNG is restored)."""
    from hvdllm.models import causal_lm_loss
    from hvdllm.models.activations import SavedActivations

    model, shape = stage.model, (micro_batch_size, seq_len)
    was_training = model.training
    model.train()
    forks = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forks):
        if stage.first:
            x = torch.randint(0, vocab_size, shape, device=device)
        else:
            x = torch.randn(*shape, model.config.hidden_size, device=device, requires_grad=True)
        with SavedActivations(exclude=list(model.parameters())) as saved, autocast():
            out = stage.forward(x)
            if stage.last:
                out = causal_lm_loss(out, torch.randint(0, vocab_size, shape, device=device))
        del out, x
    model.train(was_training)
    return saved.bytes


# -- estimated from the sizes -----------------------------------------------------------------------
def block_bytes_per_token(config, low_precision: bool) -> int:
    """Saved bytes per token of one decoder block (weight copies excluded), per family.

    Llama-likes: RMSNorms keep their fp32 input, normalised input and rsqrt (4d + 2 fp32), the
    attention keeps the softmax's log-sum-exp (h fp32); matmul inputs and outputs - q, k, v,
    attention output, gate/up/SiLU/product (4f) - are in the autocast dtype. GPT-2: LayerNorms
    keep input, mean and rstd (2d + 4 fp32); qkv, attention output, the MLP's 4d-wide tensors.
    Calibrated on SavedActivations (exact for both families, fp32 and bf16, CPU sdpa).
    """
    d, h = config.hidden_size, config.num_attention_heads
    if config.model_type == "gpt2":
        return 4 * (28 * d + h + 4) if not low_precision else 4 * (2 * d + h + 4) + 2 * 26 * d
    f = config.intermediate_size
    kvd = getattr(config, "num_key_value_heads", h) * (d // h)
    if not low_precision:
        return 4 * (8 * d + 4 * f + 2 * kvd + h + 2)
    return 4 * (4 * d + 2 + h) + 2 * (7 * d + 4 * f + 2 * kvd)


def matmul_weight_bytes(module: torch.nn.Module, low_precision: bool) -> int:
    """Autocast's low-precision copies of a module's matmul weights (2 bytes each), kept per
    forward for backward; nothing in fp32."""
    if not low_precision:
        return 0
    n = sum(p.numel() for name, p in module.named_parameters()
            if p.dim() == 2 and "wte" not in name and "wpe" not in name and "embed" not in name)
    return 2 * n


def stage_activation_estimate(stage, tokens: int, seq_len: int, low_precision: bool,
                              checkpointed: frozenset[int]) -> tuple[int, int]:
    """(saved bytes of one micro-batch, of which autocast weight copies) for a stage."""
    config, spec = stage.model.config, stage.spec
    d, lp = config.hidden_size, 2 if low_precision else 4
    blocks = spec.blocks(stage.model)
    saved, copies = 0, 0
    for i in stage.layers:
        if i in checkpointed:
            saved += 4 * d * tokens  # only the block's fp32 input is kept
        else:
            saved += block_bytes_per_token(config, low_precision) * tokens
            copies += matmul_weight_bytes(blocks[i], low_precision)
    if config.model_type != "gpt2" and len(stage.layers):
        saved += 2 * seq_len * (d // config.num_attention_heads) * 4  # rotary cos, sin
    if stage.first:
        saved += 8 * tokens + (8 * seq_len if config.model_type == "gpt2" else 0)  # ids, positions
    if stage.last:
        norm = 4 * (d + 2) if config.model_type == "gpt2" else 4 * (2 * d + 1)
        saved += tokens * (8 + norm + lp * d + 4 * config.vocab_size)
        copies += 2 * stage.model.lm_head.weight.numel() if low_precision else 0
    return saved + copies, copies


def transient_estimate(stage, tokens: int, low_precision: bool, checkpointed: frozenset[int],
                       device_type: str = "cuda") -> int:
    """The backward's and the step's working set: a block's activation gradients (about one
    block's saved bytes), the logits' fp32 gradient on the last stage, a recomputed block if
    any; the fusion buffer the gradients fill; the optimizer's temporaries (foreach on GPUs:
    about the parameters' bytes; per tensor on the CPU: twice the largest)."""
    params = [p for p in stage.model.parameters() if p.requires_grad]
    grads = tensor_bytes(params)
    largest = max((p.numel() * p.element_size() for p in params), default=0)
    step = grads if device_type == "cuda" else 2 * largest
    return min(grads, FUSION_BYTES) + step + _backward_bytes(stage, tokens, low_precision,
                                                             checkpointed)


def _backward_bytes(stage, tokens: int, low_precision: bool, checkpointed: frozenset[int]) -> int:
    config = stage.model.config
    block = block_bytes_per_token(config, low_precision) * tokens if len(stage.layers) else 0
    recompute = block if any(i in checkpointed for i in stage.layers) else 0
    logits = 2 * 4 * config.vocab_size * tokens if stage.last else 0
    return block + recompute + logits


# -- one rank of a run ------------------------------------------------------------------------------
def _assemble(stage_index: int, params: list[torch.Tensor], optimizer: int, per_mb: int,
              copies: int, flying: int, transient: int, fixed: int) -> RankMemory:
    p = tensor_bytes(params)
    acts = per_mb * flying
    return RankMemory(stage=stage_index, parameters=p, gradients=p, optimizer=optimizer,
                      activations_per_micro_batch=per_mb, weight_copies_per_micro_batch=copies,
                      in_flight=flying, activations=acts, transient=transient, fixed=fixed,
                      predicted_peak=fixed + 2 * p + optimizer + acts + transient)


def fixed_bytes(device_type: str, rank0: bool) -> int:
    """The per-process memory outside the model (rank 0 also writes the metrics)."""
    if device_type == "cuda":
        return FIXED_GPU_BYTES
    return FIXED_CPU_BYTES + (WRITER_CPU_BYTES if rank0 else 0)


def rank_memory(t) -> dict:
    """This rank's accounting at start-up (a Trainer): exact counts, one measured micro-batch;
    every rank's record gathered to all (a collective: call it on every rank)."""
    import horovod.torch as hvd

    job, topo, layout = t.job, t.topo, t.topo.layout
    tokens = layout.micro_batch_size * job.data.seq_len
    low = job.precision.dtype != "fp32"
    per_mb = measure_activations(t.stage, t.device, t.runner.autocast, layout.micro_batch_size,
                                 job.data.seq_len, t.model.config.vocab_size)
    estimated, copies = stage_activation_estimate(t.stage, tokens, job.data.seq_len, low,
                                                  t.stage.checkpointed)
    params = [p for p in t.model.parameters() if p.requires_grad]
    # t.params are what the optimizer holds: the stage's parameters, or ZeRO-1's slice parts.
    transient = transient_estimate(t.stage, tokens, low, t.stage.checkpointed, t.device.type)
    if job.parallel.zero:
        transient += zero_exchange_bytes(params, layout.replicas)
    mine = _assemble(topo.stage, params, optimizer_state_bytes(t.params, job.optim), per_mb,
                     copies, in_flight(job.parallel.schedule, topo.stages, topo.stage,
                                       layout.micro_batches),
                     transient, fixed_bytes(t.device.type, topo.rank == 0)).as_dict()
    mine.update(rank=topo.rank, host=socket.gethostname(),  # which node: for reading peaks
                activations_estimated_per_micro_batch=estimated,
                startup_peak=measured_peak(t.device))
    return {"ranks": hvd.allgather_object(mine, name="memory_startup")}


def startup_line(memory: dict) -> str:
    """One log line: the largest rank's accounting, in MiB."""
    r = max(memory["ranks"], key=lambda x: x["predicted_peak"])
    return (f"memory (largest rank {r['rank']}, stage {r['stage']}): parameters "
            f"{r['parameters'] / MIB:.0f} MiB, gradients {r['gradients'] / MIB:.0f}, optimizer "
            f"{r['optimizer'] / MIB:.0f}, activations {r['activations'] / MIB:.0f} "
            f"({r['in_flight']} x {r['activations_per_micro_batch'] / MIB:.1f} measured, autocast "
            f"weight copies {r['weight_copies_per_micro_batch'] / MIB:.1f}), fixed "
            f"{r['fixed'] / MIB:.0f}, predicted peak {r['predicted_peak'] / MIB:.0f} MiB")


def record_peaks(t, memory: dict, run_info: Path) -> None:
    """After training: every rank's measured peak into memory (collective) and, on rank 0,
    into run_info.json's "memory"."""
    import json

    import horovod.torch as hvd

    peaks = hvd.allgather_object(measured_peak(t.device), name="memory_peak")
    for record, peak in zip(memory["ranks"], peaks):
        record["measured_peak"] = peak
    memory["measured_peak_max"] = max(peaks)
    memory["predicted_peak_max"] = max(r["predicted_peak"] for r in memory["ranks"])
    if t.topo.rank == 0 and run_info.is_file():
        info = json.loads(run_info.read_text())
        info["memory"] = memory
        run_info.write_text(json.dumps(info, indent=2) + "\n")


# -- a job before launch ----------------------------------------------------------------------------
def job_vocab_size(job: JobConfig) -> int:
    """The prepared tokenizer's vocabulary when the data is there, else the job's."""
    import json

    meta = job.data_dir / "meta.json"
    if meta.is_file():
        return int(json.loads(meta.read_text())["vocab_size"])
    return job.data.vocab_size


def meta_stages(job: JobConfig, stages: int) -> list:
    """The job's model cut into `stages` Stages as a run cuts it, on the meta device (sizes only)."""
    from hvdllm.models import Stage, empty_model, model_config, partition_for

    config = model_config(job.model, job_vocab_size(job), job.data.seq_len)
    ranges = partition_for(empty_model(config), stages, job.parallel.stage_layers or None)
    return [Stage(empty_model(config), layers, s == 0, s == stages - 1)
            for s, layers in enumerate(ranges)]


def predict(job: JobConfig, world: int, device_type: str = "cuda",
            stages: list | None = None) -> list[RankMemory]:
    """Per-stage prediction (every replica of a stage is alike) from the model's sizes: the
    model is built on the meta device only (or `stages`, meta_stages() of the same cut, reused)."""
    from hvdllm.layout import job_layout
    from hvdllm.models.activations import checkpointed_blocks

    layout = job_layout(job, world)
    stages = stages or meta_stages(job, layout.stages)
    config = stages[0].model.config
    checkpointed = checkpointed_blocks(job.training.activation_checkpointing,
                                       job.training.checkpoint_every_blocks, config.num_hidden_layers)
    tokens, low = layout.micro_batch_size * job.data.seq_len, job.precision.dtype != "fp32"
    zero = getattr(job.parallel, "zero", 0)
    rows = []
    for s, stage in enumerate(stages):
        params = [p for p in stage.model.parameters() if p.requires_grad]
        per_mb, copies = stage_activation_estimate(stage, tokens, job.data.seq_len, low, checkpointed)
        optimizer = zero_optimizer_bytes(params, job.optim, layout.replicas) if zero \
            else optimizer_state_bytes(params, job.optim)
        transient = transient_estimate(stage, tokens, low, checkpointed, device_type)
        if zero:
            transient += zero_exchange_bytes(params, layout.replicas)
        rows.append(_assemble(s, params, optimizer, per_mb, copies,
                              in_flight(job.parallel.schedule, layout.stages, s, layout.micro_batches),
                              transient, fixed_bytes(device_type, s == 0)))
    return rows


def table(rows: list[RankMemory], header: str) -> str:
    """The prediction as a text table, GiB per rank of each stage, and the largest peak."""
    gib = 2.0 ** 30
    cols = ["stage", "params", "grads", "optimizer", "activations", "in flight", "transient",
            "fixed", "peak"]
    lines = [header, "  ".join(f"{c:>11}" for c in cols)]
    for r in rows:
        vals = [r.parameters, r.gradients, r.optimizer, r.activations]
        cells = [f"{r.stage:>11}"] + [f"{v / gib:>11.2f}" for v in vals] + [f"{r.in_flight:>11}"]
        cells += [f"{v / gib:>11.2f}" for v in (r.transient, r.fixed, r.predicted_peak)]
        lines.append("  ".join(cells))
    lines.append(f"largest per-rank peak: {max(r.predicted_peak for r in rows) / gib:.2f} GiB "
                 f"(GiB per rank; every replica of a stage is alike)")
    return "\n".join(lines) + "\n"
