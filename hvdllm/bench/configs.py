"""The rows of `hvdllm bench`: which launches are compared, and each one's baseline row."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Config:
    """One row: a launch configuration and the row its throughput ratio is taken against."""

    name: str
    ranks: int
    sets: list[str] = field(default_factory=list)
    peer: bool = False
    """Run the torch DDP peer (hvdllm.bench.ddp_peer) instead of hvdllm train."""
    baseline: str = ""
    """Name of the row this one's ratio is taken against."""
    timed: tuple[int, int] | None = None
    """Steps (numbered from 1) whose wall-clock times make this row's step time; None: every
    step after the warm-up but the last."""
    controller: str = "mpi"
    """Horovod's controller: "mpi" (the ranks started by mpirun) or "gloo" (by horovodrun
    --gloo; only the network rows use it)."""


def pipeline_rows(quick: bool, dtype: str, baseline: str) -> list[Config]:
    """2-stage pipelines, both schedules, at one (quick) or three micro-batch counts."""
    rows = []
    for m in ((4,) if quick else (2, 4, 8)):
        for schedule in ("gpipe", "1f1b"):
            rows.append(Config(f"pipeline P=2 {schedule} m={m} {dtype}", 2,
                               ["parallel.pipeline_stages=2", f"parallel.schedule={schedule}",
                                f"parallel.micro_batches={m}", "training.micro_batch_size=0"],
                               baseline=baseline))
    return rows


def profiled_row(dtype: str, warmup: int, baseline: str) -> Config:
    """training.profile as a user runs it: three profiled steps after the warm-up, of which the
    first two are timed (the third's wall time includes writing the trace)."""
    first = warmup + 1
    return Config(f"1 rank {dtype} profiled", 1,
                  ["training.profile=true", f"training.profile_start_step={first}",
                   "training.profile_steps=3"], baseline=baseline, timed=(first, first + 1))


def configurations(ranks: int, quick: bool, dtype: str, warmup: int) -> list[Config]:
    """The rows: both precisions on one rank; then, at the job's precision, Horovod and the DDP
    peer on `ranks` ranks and 2-stage pipelines, each with the row it is compared against."""
    one = f"1 rank {dtype}"
    dp, peer = f"{ranks} ranks Horovod {dtype}", f"{ranks} ranks torch DDP {dtype}"
    return [Config("1 rank fp32", 1, ["precision.dtype=fp32"]),
            Config("1 rank bf16", 1, ["precision.dtype=bf16"], baseline="1 rank fp32"),
            Config(peer, ranks, peer=True, baseline=one),
            Config(dp, ranks, baseline=peer),
            Config(f"{dp} fp16 compression", ranks, ["parallel.compression=fp16"], baseline=dp),
            Config(f"{dp} bf16 compression", ranks, ["parallel.compression=bf16"], baseline=dp),
            Config(f"{dp} ZeRO-1", ranks, ["parallel.zero=1"], baseline=dp),
            Config(f"1 rank {dtype} activation checkpointing", 1,
                   ["training.activation_checkpointing=blocks"], baseline=one),
            profiled_row(dtype, warmup, one),
            *pipeline_rows(quick, dtype, one)]
