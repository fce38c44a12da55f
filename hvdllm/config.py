"""Job files: one dataclass per TOML section, loaded with tomllib and validated before anything runs.

A job file is plain TOML. Every key is declared below with its type and default; the string after
each field is its documentation (docs/configuration.md mirrors it). Nothing here executes code
from the file: values are parsed by tomllib and checked against the declared types.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hvdllm.errors import UserError
from hvdllm.layout import check_batch_settings


class ConfigError(UserError):
    """A job file or override that cannot be used; the message is one line meant for the user."""


@dataclass
class RunConfig:
    name: str = "run"
    """Name of the run; used in logs, TensorBoard and the default run directory."""
    dir: str = ""
    """Run directory (job.toml, metrics.jsonl, tb/, checkpoints/). Empty: runs/<name>."""
    seed: int = 1234
    """Seed for model init and data sampling; the same seed gives the same model and batches on
    any layout (losses then agree to rounding)."""


@dataclass
class DataConfig:
    source: str = "python-stdlib"
    """Corpus. "python-stdlib": this interpreter's standard library as Python code, without its
    test suites (test/, tests/, idle_test/), codec tables (encodings/), IDLE (idlelib/), pydoc's
    help text (pydoc_data/) and generated tables (html/entities.py, stringprep.py,
    re/_casefix.py, _sysconfigdata_*.py): about 550 files, 9 MB on Python 3.11.
    "python-stdlib/email": one package of it, with the same exclusions below it. Otherwise a
    directory (its .txt/.py/.md/.jsonl files, recursively), a glob of such files
    ("corpus/*.jsonl"), or one .jsonl file; each .jsonl line is a JSON object with a "text"
    field. Also .jsonl.gz, .jsonl.zst and .parquet files, and a Hugging Face dataset saved with
    save_to_disk (its directory; every split); read from local files only."""
    text_field: str = "text"
    """The field of a .jsonl record, or the column of a parquet file or saved dataset, that
    holds the document's text."""
    on_bad_record: Literal["error", "skip"] = "error"
    """A record without the text field, or whose field is not a string: "error" stops prepare
    with one line naming the file and record (exit 2); "skip" leaves it out and counts it (the
    count and the first such record are logged at the end)."""
    tokenizer_sample_bytes: int = 50_000_000
    """The BPE is trained on at most this many bytes of training documents: an equal share from
    the start of every work unit, so tokenizer training does not grow with the corpus."""
    shard_bytes: int = 64_000_000
    """Input files are grouped, in order, into work units of about this many bytes on disk (a
    larger file is a unit alone), tokenized in parallel; a unit writes token shards of about
    this many bytes. Changes the files, not the tokens."""
    workers: int = 0
    """Tokenizer processes per rank for prepare; 0: this rank's share of the node's cores."""
    tokenizer: str = "bpe"
    """"bpe" trains a byte-level BPE on the corpus; otherwise a local Hugging Face tokenizer dir."""
    vocab_size: int = 8192
    """Vocabulary size of the trained BPE (ignored when a tokenizer directory is given)."""
    seq_len: int = 256
    """Tokens per training sequence (the model's context length)."""
    val_fraction: float = 0.02
    """Fraction of documents held out for validation (split by document, at least one)."""
    dir: str = ""
    """Where prepared tokens and the tokenizer are written. Empty: <run.dir>/data."""


@dataclass
class ModelConfig:
    family: Literal["gpt2", "llama", "mistral", "qwen2"] = "gpt2"
    """Model family built with transformers: "gpt2" (head tied to the token embedding), "llama",
    or the Llama-likes "mistral" and "qwen2" (sliding-window attention, Qwen2's q/k/v biases)."""
    pretrained: str = ""
    """Local Hugging Face model directory to fine-tune; empty builds a fresh model from the sizes."""
    n_layer: int = 4
    """Number of decoder blocks."""
    n_embd: int = 256
    """Hidden size."""
    n_head: int = 4
    """Attention heads."""
    n_kv_head: int = 0
    """Llama-likes: key/value heads for grouped-query attention; 0 means n_head."""
    intermediate_size: int = 0
    """Llama-likes: MLP width; 0 means about 8/3 x n_embd rounded up to a multiple of 64."""
    tie_embeddings: bool = False
    """Llama-likes: share the output head's weight with the token embedding (GPT-2 always does)."""
    sliding_window: int = 0
    """mistral and qwen2: each token attends to at most this many previous tokens (every layer);
    0 is full causal attention."""
    dropout: float = 0.0
    """Dropout probability inside the model (GPT-2 only). Dropout is reseeded from (seed, step,
    rank), so resumes stay exact; comparing different layouts needs 0."""


@dataclass
class TrainingConfig:
    steps: int = 100
    """Optimizer steps to train."""
    micro_batch_size: int = 4
    """Sequences per forward/backward pass on one rank; 0 derives it from parallel.micro_batches
    (global_batch_size / (micro_batches x replicas))."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all replicas; = micro_batch_size x micro-batches x
    replicas, whatever the layout."""
    log_every: int = 10
    """Log a line, metrics.jsonl and TensorBoard scalars every this many steps."""
    eval_every: int = 0
    """Evaluate on validation tokens every this many steps (0: only at the end)."""
    eval_batches: int = 4
    """Global batches of validation windows per evaluation."""
    checkpoint_every: int = 0
    """Write a checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value after the all-reduce (0 disables)."""
    threads: int = 0
    """Torch intra-op threads per rank on CPU; 0 divides the machine's cores among the local ranks
    (ignored on GPUs)."""
    activation_checkpointing: Literal["none", "blocks"] = "none"
    """"blocks" keeps only each checkpointed decoder block's input for backward and recomputes
    the block there (non-reentrant, same dropout masks): less activation memory for about one
    more forward. "none" keeps every activation. Evaluation never checkpoints."""
    checkpoint_every_blocks: int = 1
    """With activation_checkpointing = "blocks": checkpoint the blocks whose index (0-based, in
    the full model, whatever the layout) is a multiple of this; 1 checkpoints every block."""


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "adagrad", "sgd"] = "adamw"
    """Optimizer."""
    lr: float = 3e-4
    """Peak learning rate (before lr_scaling)."""
    weight_decay: float = 0.1
    """Weight decay (decoupled for adamw, L2 for the others); norms and biases are exempt."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam/AdamW moment coefficients."""
    eps: float = 1e-8
    """Adam/AdamW/Adagrad epsilon."""
    momentum: float = 0.9
    """SGD momentum (0 gives plain SGD)."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    schedule: Literal["constant", "linear", "cosine", "gradnorm"] = "cosine"
    """Learning-rate schedule after warmup; "gradnorm" adapts the rate to the gradient norm."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to the peak rate."""
    min_lr_ratio: float = 0.1
    """Final rate of the linear and cosine schedules, as a fraction of the peak."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """Scale the peak rate with the number of data-parallel replicas R: none, x R, or x sqrt(R)."""
    gradnorm_alpha: float = 0.5
    """gradnorm schedule: lr = lr0 * (1 + beta * |g|^2 / (eps + |g|)) ** -alpha."""
    gradnorm_beta: float = 1.0
    """gradnorm schedule: beta (see gradnorm_alpha)."""
    gradnorm_eps: float = 1e-6
    """gradnorm schedule: eps (see gradnorm_alpha)."""


@dataclass
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast compute dtype; weights and optimizer state stay fp32."""
    initial_scale: float = 65536.0
    """fp16 only: initial dynamic loss scale."""
    growth_interval: int = 200
    """fp16 only: steps without overflow before the loss scale doubles."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s per rank for MFU; 0 measures a matmul at start for the chosen dtype."""


@dataclass
class ParallelConfig:
    pipeline_stages: int = 1
    """Pipeline stages P; the world size must be a multiple of P (replicas R = world / P)."""
    micro_batches: int = 0
    """Micro-batches per replica per step (gradient accumulation; the pipeline's m). 0 derives it:
    global_batch_size / (micro_batch_size x replicas). Setting both this and
    training.micro_batch_size fixes the number of replicas the job runs on."""
    schedule: Literal["gpipe", "1f1b"] = "1f1b"
    """Pipeline schedule."""
    stage_layers: list[int] = field(default_factory=list)
    """Decoder blocks per stage (sums to n_layer); empty balances automatically."""
    compression: Literal["none", "fp16"] = "none"
    """Gradient compression for the all-reduce (with zero = 1: the reduce-scatter): "fp16" halves
    the bytes sent."""
    zero: int = 0
    """1: ZeRO-1, each stage's optimizer state split over its replicas (gradients reduce-scattered,
    each replica updates its slice, parameters all-gathered); 0: plain data parallelism."""
    peer_timeout_s: float = 300.0
    """Seconds a rank waits for another (a pipeline message, an all-reduce, a barrier) before it
    ends the job with a message saying what it waited for; 0 waits forever."""


@dataclass
class SlurmConfig:
    launcher: Literal["srun", "mpirun", "horovodrun"] = "srun"
    """How `hvdllm slurm` starts the ranks: "srun" (--mpi=pmix), "mpirun" inside the allocation, or
    "horovodrun" (Gloo) on hosts taken from the allocation; hvdllm/launch/templates/<launcher>.part
    is its part of the template."""
    nodes: int = 1
    """Nodes to allocate (world size = nodes x tasks_per_node)."""
    tasks_per_node: int = 1
    """Ranks per node: one per GPU, or per share of the cores on CPU-only nodes."""
    gpus_per_node: int = 0
    """GPUs to allocate per node (0: CPU-only nodes, no GPU request)."""
    gpu_memory_gb: float = 0
    """Memory of one GPU in GiB (e.g. 80): `hvdllm slurm` warns when the predicted per-rank peak
    (`hvdllm memory`) does not fit it; 0: unknown, no check."""
    cpus_per_task: int = 0
    """CPU cores per rank (torch threads); 0 leaves it to Slurm's default."""
    time: str = "01:00:00"
    """Time limit: minutes, HH:MM:SS or D-HH:MM:SS."""
    partition: str = ""
    """Partition to submit to; empty: the cluster's default."""
    account: str = ""
    """Account to charge; empty: your default account."""
    signal_seconds: int = 120
    """Seconds before the time limit at which Slurm warns the job (USR1): it checkpoints and requeues."""
    sbatch: list[str] = field(default_factory=list)
    """Extra sbatch options, one per entry, e.g. ["--mem=0", "--exclusive"]."""
    modules: list[str] = field(default_factory=list)
    """Environment modules to `module load` on the nodes before launching."""
    env: list[str] = field(default_factory=list)
    """NAME=value pairs exported to every rank, e.g. ["NCCL_DEBUG=WARN"]."""
    hvdllm: str = ""
    """The hvdllm command on the nodes; empty: this installation's (absolute path)."""


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir or f"runs/{self.run.name}")

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir) if self.data.dir else self.run_dir / "data"


SECTIONS: dict[str, type] = typing.get_type_hints(JobConfig)
"""Section name -> its dataclass, in file order."""


# --------------------------------------------------------------------------------------------
# Type checking of values against the declared field types
# --------------------------------------------------------------------------------------------

def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return value as type tp, or raise ConfigError naming the key and what is allowed."""
    origin = typing.get_origin(tp)
    ok = False
    if origin is Literal:
        ok = value in typing.get_args(tp)
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(v, typing.get_args(tp)[0], key) for v in value]
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{key} = {value!r} is not allowed: expected {_describe(tp)}")
    return value


def _unknown(kind: str, name: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(valid)}"
    return ConfigError(f"{where}unknown {kind} {name!r}{hint}")


def _build(raw: dict[str, Any], where: str) -> JobConfig:
    job = JobConfig()
    for section, values in raw.items():
        if section not in SECTIONS:
            raise _unknown("section", section, list(SECTIONS), where)
        if not isinstance(values, dict):
            raise ConfigError(f"{where}[{section}] must be a table")
        obj = getattr(job, section)
        hints = typing.get_type_hints(type(obj))
        for key, value in values.items():
            if key not in hints:
                raise _unknown(f"key in [{section}]", key, list(hints), where)
            setattr(obj, key, _coerce(value, hints[key], f"{where}{section}.{key}"))
    return job


# --------------------------------------------------------------------------------------------
# Loading, overriding, validating
# --------------------------------------------------------------------------------------------

def parse_override(text: str) -> tuple[str, str, Any]:
    """Split "section.key=value" and type the value by the schema (strings stay verbatim)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    path, value_text = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    if section not in SECTIONS:
        raise _unknown("section", section, list(SECTIONS), "--set: ")
    hints = typing.get_type_hints(SECTIONS[section])
    if key not in hints:
        raise _unknown(f"key in [{section}]", key, list(hints), "--set: ")
    tp = hints[key]
    if tp is str or (typing.get_origin(tp) is Literal and isinstance(typing.get_args(tp)[0], str)):
        return section, key, value_text
    try:
        value = tomllib.loads(f"v = {value_text}")["v"]
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"--set {path}={value_text}: expected {_describe(tp)}") from None
    return section, key, value


def load_job(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """Read a TOML job file, apply --set overrides and validate the result."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"job file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); a job file is TOML") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})[key] = value
    job = _build(raw, f"{path}: ")
    validate(job)
    return job


def job_from_toml(text: str) -> JobConfig:
    """Rebuild a job from the TOML written by dump_toml (checkpoints, run directories)."""
    job = _build(tomllib.loads(text), "")
    validate(job)
    return job


MAX_STEPS = 99_999_999
"""Checkpoint directories carry the step in 8 digits."""

LIMITS = [
    ("training", "steps", MAX_STEPS, "checkpoint names carry the step in 8 digits"),
    ("data", "vocab_size", 2 ** 32, "tokens are stored as uint32 at most"),
    ("data", "seq_len", 2 ** 20, "no model here has a context that long"),
    ("model", "n_layer", 10_000, "no model has that many layers"),
    ("model", "n_embd", 2 ** 20, "no model is that wide"),
    ("training", "global_batch_size", 2 ** 31 - 1, "the batch index would overflow"),
]
"""Numbers no run could reach, refused up front instead of failing deep inside a step."""


def validate(job: JobConfig) -> None:
    """Cross-field checks that do not depend on the world size (hvdllm.layout.plan does those)."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    for section, name in [("training", "steps"),
                          ("training", "global_batch_size"), ("training", "log_every"),
                          ("data", "seq_len"), ("data", "vocab_size"), ("model", "n_layer"),
                          ("model", "n_embd"), ("model", "n_head"),
                          ("parallel", "pipeline_stages")]:
        need(getattr(getattr(job, section), name) > 0, f"{section}.{name} must be > 0")
    for section, name in [("training", "eval_every"), ("training", "checkpoint_every"),
                          ("optim", "warmup_steps"), ("training", "threads"),
                          ("parallel", "micro_batches"), ("training", "grad_clip"),
                          ("parallel", "peer_timeout_s")]:
        need(getattr(getattr(job, section), name) >= 0, f"{section}.{name} must be >= 0")
    need(job.training.keep_checkpoints >= 1, "training.keep_checkpoints must be >= 1")
    need(job.training.checkpoint_every_blocks >= 1, "training.checkpoint_every_blocks must be >= 1")
    for section, name, limit, why in LIMITS:
        need(getattr(getattr(job, section), name) <= limit,
             f"{section}.{name} = {getattr(getattr(job, section), name)} is over {limit:,}: {why}")
    need(0 < job.data.val_fraction < 1, "data.val_fraction must be between 0 and 1")
    need(job.data.vocab_size >= 300, "data.vocab_size must be >= 300 (256 bytes + merges)")
    need(job.optim.lr > 0, "optim.lr must be > 0")
    need(len(job.optim.betas) == 2 and all(0 <= b < 1 for b in job.optim.betas),
         "optim.betas must be two numbers in [0, 1)")
    need(0 <= job.optim.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]")
    need(job.model.n_embd % job.model.n_head == 0,
         f"model.n_embd ({job.model.n_embd}) must be divisible by model.n_head ({job.model.n_head})")
    kv = job.model.n_kv_head or job.model.n_head
    need(job.model.n_head % kv == 0, "model.n_head must be a multiple of model.n_kv_head")
    need(0 <= job.model.dropout < 1, "model.dropout must be in [0, 1)")
    need(job.model.sliding_window >= 0, "model.sliding_window must be >= 0")
    need(job.parallel.zero in (0, 1), f"parallel.zero = {job.parallel.zero}: expected 0 or 1")
    need(not job.model.sliding_window or job.model.family in ("mistral", "qwen2"),
         f"model.sliding_window is for mistral and qwen2, not {job.model.family}")
    need(not job.model.tie_embeddings or job.model.family != "gpt2",
         "model.tie_embeddings is for the Llama-likes; GPT-2 always ties its head")
    try:
        check_batch_settings(job.training.global_batch_size, job.training.micro_batch_size,
                             job.parallel.micro_batches)
    except UserError as e:
        raise ConfigError(str(e)) from None
    if job.parallel.stage_layers:
        need(len(job.parallel.stage_layers) == job.parallel.pipeline_stages,
             "parallel.stage_layers must list one layer count per pipeline stage")
        need(sum(job.parallel.stage_layers) == job.model.n_layer and min(job.parallel.stage_layers) > 0,
             f"parallel.stage_layers must be positive and sum to model.n_layer ({job.model.n_layer})")
    need(job.parallel.pipeline_stages <= job.model.n_layer,
         f"parallel.pipeline_stages ({job.parallel.pipeline_stages}) exceeds model.n_layer "
         f"({job.model.n_layer}): every stage needs at least one layer")


# --------------------------------------------------------------------------------------------
# Writing a resolved job back out
# --------------------------------------------------------------------------------------------

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # JSON string escapes are valid TOML


def dump_toml(job: JobConfig) -> str:
    """The fully resolved job as TOML (every key, defaults included)."""
    lines: list[str] = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for f in dataclasses.fields(getattr(job, section)):
            lines.append(f"{f.name} = {_toml_value(getattr(getattr(job, section), f.name))}")
        lines.append("")
    return "\n".join(lines)
