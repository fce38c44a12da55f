"""The two case studies of `hvdllm bench --case-studies`: real training runs compared on the
validation loss they reach and the time they take to reach it.

1. Data parallel with mixed precision (bf16) against full precision (fp32), same layout.
2. SGD against SGD with momentum against AdamW, same layout and precision.

Each variant is one `hvdllm train` launch with evaluation every `eval_every` steps. The target is
the worst final validation loss among a study's variants, so that every variant reaches it; the
report gives the step and the wall-clock seconds at which each variant first did.
"""

from __future__ import annotations

import json
from pathlib import Path

from hvdllm.bench.launcher import hvdllm_command, run_ranks, set_args
from hvdllm.log import logger

CASE_TIMEOUT_S = 3 * 3600
"""A case-study run longer than this is reported as hung (they train for minutes, not hours)."""

STUDIES = {
    "mixed precision": {"fp32": ["precision.dtype=fp32"], "bf16": ["precision.dtype=bf16"]},
    "optimizers": {
        "sgd": ["optim.name=sgd", "optim.momentum=0", "optim.lr=0.3", "optim.weight_decay=0"],
        "sgd-momentum": ["optim.name=sgd", "optim.momentum=0.9", "optim.lr=0.03",
                         "optim.weight_decay=0"],
        "adamw": ["optim.name=adamw"],
    },
}


def run_variant(job_path: str, sets: list[str], run_dir: Path, ranks: int, steps: int,
                eval_every: int) -> list[dict]:
    """Train one variant under mpirun; returns its metrics rows that carry a validation loss."""
    args = [*sets, f"run.dir={run_dir}", f"training.steps={steps}",
            f"training.eval_every={eval_every}", f"training.log_every={eval_every}",
            "training.checkpoint_every=0"]
    run_ranks(ranks, hvdllm_command("train", job_path, *set_args(args)), f"case study {run_dir.name}",
              timeout_s=CASE_TIMEOUT_S)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_loss" in r]


def reach(curve: list[dict], target: float) -> dict | None:
    """The first evaluation at or below `target` (None if the curve never gets there)."""
    return next((r for r in curve if r["val_loss"] <= target), None)


def case_studies(job_path: str, sets: list[str], out: Path, ranks: int, steps: int,
                 eval_every: int) -> dict:
    """Run every study's variants; each study's target is its worst final validation loss."""
    results: dict[str, dict] = {}
    for study, variants in STUDIES.items():
        curves = {}
        for name, extra in variants.items():
            logger.info("case study %s: %s (%d steps on %d ranks)", study, name, steps, ranks)
            curves[name] = run_variant(job_path, [*sets, *extra], out / "cases" / name, ranks,
                                       steps, eval_every)
        target = max(c[-1]["val_loss"] for c in curves.values())
        results[study] = {"target_val_loss": target, "variants": {
            name: {"final_val_loss": c[-1]["val_loss"], "seconds": c[-1]["elapsed_s"],
                   "steps_to_target": reach(c, target)["step"],
                   "seconds_to_target": reach(c, target)["elapsed_s"],
                   "curve": [(r["step"], r["val_loss"]) for r in c]}
            for name, c in curves.items()}}
    return results


def markdown(results: dict, ranks: int, steps: int) -> str:
    """The case studies as a Markdown section (one table per study)."""
    lines = [f"## Case studies ({ranks} ranks, {steps} steps each)", ""]
    for study, r in results.items():
        lines += [f"### {study}: target val loss {r['target_val_loss']:.3f} (the worst final)", "",
                  "| variant | final val loss | steps to target | seconds to target | total seconds |",
                  "|---|---|---|---|---|"]
        for name, v in r["variants"].items():
            lines.append(f"| {name} | {v['final_val_loss']:.3f} | {v['steps_to_target']} | "
                         f"{v['seconds_to_target']:.0f} | {v['seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)
