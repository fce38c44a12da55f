"""The job schema: one dataclass per TOML section, a docstring per field.

Every key is declared here with its type and default; the string after each field is its
documentation (docs/configuration.md is generated from it by `python -m hvdllm.config_doc`).
Loading, overrides and validation are in load.py.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hvdllm.errors import UserError


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
    profile: bool = False
    """Profile steps profile_start_step .. + profile_steps - 1 with torch.profiler (CPU and, on
    GPUs, CUDA activities; shapes and memory): one trace per rank in run_dir/profile/, for
    Perfetto, chrome://tracing or TensorBoard's PyTorch profiler plugin. Off: no profiler exists."""
    profile_start_step: int = 3
    """First profiled step (numbered from 1, like the logs; the first steps are warm-up). Also the
    first step of parallel.horovod_timeline."""
    profile_steps: int = 2
    """How many steps training.profile and parallel.horovod_timeline record. The profiler holds
    every event in host memory until it writes the trace (about 1 GB a step for the quickstart
    job on CPU): profile a few steps, not a run."""
    pipeline_chart_every: int = 0
    """Draw one step's spans on every rank (forward, backward, waits for messages, gradient sync,
    optimizer) as a Gantt chart, run_dir/pipeline/step{N}.png and TensorBoard's images, every this
    many steps; 0: once, at the second step of each launch (the first is warm-up)."""


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
    compression: Literal["none", "fp16", "bf16"] = "none"
    """Gradient compression for the all-reduce (with zero = 1: the reduce-scatter): "fp16" or
    "bf16" halve the bytes sent. fp16 sums are pre-divided by the replicas and checked for
    overflow by every rank (an overflowing step is skipped); bf16 cannot overflow but keeps 8
    significant bits (hvdllm/parallel/compression.py)."""
    zero: int = 0
    """1: ZeRO-1, each stage's optimizer state split over its replicas (gradients reduce-scattered,
    each replica updates its slice, parameters all-gathered); 0: plain data parallelism."""
    horovod_timeline: bool = False
    """Record Horovod's timeline (negotiation, fusion, the all-reduce of each gradient) for the
    steps training.profile_start_step .. + profile_steps - 1, written by rank 0 to
    run_dir/profile/horovod_timeline.steps{A}-{B}.json (sets HOROVOD_TIMELINE=DYNAMIC)."""
    peer_timeout_s: float = 300.0
    """Seconds a rank waits for another (a pipeline message, an all-reduce, a barrier) before it
    ends the job with a message saying what it waited for; 0 waits forever."""
    elastic_commit_every: int = 10
    """Under Horovod's elastic mode (horovodrun --min-np/--max-np/--host-discovery-script): commit
    the training state to memory every this many steps; when a worker is lost the others roll back
    to the last commit, so at most this many steps are trained again (docs/elastic.md)."""


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
