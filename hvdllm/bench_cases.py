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
import os
import subprocess
import sys
from pathlib import Path

from hvdllm.bench import MPI_ENV
from hvdllm.log import logger

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
    args = [*sets, f"run.dir={run_dir}", f"training.steps={steps}",
            f"training.eval_every={eval_every}", f"training.log_every={eval_every}",
            "training.checkpoint_every=0"]
    cmd = ["mpirun", "-np", str(ranks), str(Path(sys.executable).parent / "hvdllm"), "train",
           job_path, *[a for s in args for a in ("--set", s)]]
    p = subprocess.run(cmd, env=dict(os.environ, **MPI_ENV), capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"case study run failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_loss" in r]


def reach(curve: list[dict], target: float) -> dict | None:
    return next((r for r in curve if r["val_loss"] <= target), None)


def case_studies(job_path: str, sets: list[str], out: Path, ranks: int, steps: int,
                 eval_every: int) -> dict:
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
