"""Whose run directory is this? A fresh `hvdllm train` never mixes with, or deletes, another run.

A run directory holds one run: its checkpoints, metrics.jsonl, TensorBoard events, job.toml,
run_info.json, pipeline charts and profiler traces. Continuing it needs `--resume` (or `--resume auto`, which Slurm requeues use);
a fresh run in a directory that holds one is refused, unless `--fresh` asks to move the old
run's files aside into RUN_DIR/previous/<UTC time>/ first. Prepared data (RUN_DIR/data by
default) and Slurm's logs stay where they are. Rank 0 decides; the others are told.
"""

from __future__ import annotations

import time
from pathlib import Path

from hvdllm.errors import UserError

RUN_FILES = ("checkpoints", "metrics.jsonl", "tb", "job.toml", "run_info.json", "pipeline",
             "profile", "elastic.jsonl")
"""What a training run writes into its run directory."""


def existing_run_files(run_dir: Path) -> list[str]:
    """The run files already in run_dir (an empty checkpoints/ folder does not count)."""
    found = []
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir() and any(path.iterdir()) or path.is_file():
            found.append(name)
    return found


def claim_run_dir(run_dir: Path, resume: str | None, fresh: bool) -> str:
    """Check (and with --fresh, clear) the run directory before anything is written.

    Returns a line for the log ("" when there is nothing to say); raises UserError when the
    run would mix with the one already there.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run.dir {str(run_dir)!r} is a file, not a directory")
    if fresh and resume is not None:
        raise UserError("--fresh starts over and --resume continues: choose one")
    continues = resume in ("auto", "latest") or (
        resume is not None and run_dir.resolve() in Path(resume).resolve().parents)
    found = existing_run_files(run_dir)
    if continues or not found:
        return ""
    if not fresh:
        raise UserError(f"{run_dir} already holds a run ({', '.join(found)}): continue it with "
                        f"--resume, or start over with --fresh (moves it to "
                        f"{run_dir / 'previous'}/)")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside, n = run_dir / "previous" / stamp, 1
    while aside.exists():  # two --fresh starts within one second
        aside, n = run_dir / "previous" / f"{stamp}-{n}", n + 1
    aside.mkdir(parents=True)
    for name in found:
        (run_dir / name).rename(aside / name)
    return f"--fresh: moved the previous run's {', '.join(found)} to {aside}"
