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


def configurations(ranks: int, quick: bool, dtype: str) -> list[Config]:
    """The rows: both precisions on one rank; then, at the job's precision, Horovod and the DDP
    peer on `ranks` ranks and 2-stage pipelines, each with the row it is compared against."""
    one = f"1 rank {dtype}"
    dp, peer = f"{ranks} ranks Horovod {dtype}", f"{ranks} ranks torch DDP {dtype}"
    return [Config("1 rank fp32", 1, ["precision.dtype=fp32"]),
            Config("1 rank bf16", 1, ["precision.dtype=bf16"], baseline="1 rank fp32"),
            Config(peer, ranks, peer=True, baseline=one),
            Config(dp, ranks, baseline=peer),
            Config(f"{dp} fp16 compression", ranks, ["parallel.compression=fp16"], baseline=dp),
            Config(f"{dp} ZeRO-1", ranks, ["parallel.zero=1"], baseline=dp),
            Config(f"1 rank {dtype} activation checkpointing", 1,
                   ["training.activation_checkpointing=blocks"], baseline=one),
            # torch.profiler on every step of the launch (the bench sets profile_steps): its cost.
            Config(f"1 rank {dtype} profiled", 1,
                   ["training.profile=true", "training.profile_start_step=1"], baseline=one),
            *pipeline_rows(quick, dtype, one)]
