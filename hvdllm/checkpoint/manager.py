"""The checkpoint manager: the one owner of a run's checkpoint files and their names.

Layout of run_dir/checkpoints/step_00000100/:
    model_stage{S}.pt  stage S's part of the model state_dict, under the full model's names
    optim_stage{S}.pt  stage S's optimizer state, keyed by parameter name (not position)
    train.pt           loss scaler and counters
    meta.json          step, layout, tokenizer fingerprint, model config, and every shard's
                       bytes, SHA-256 and the names it holds
    job.toml           the resolved job that wrote it
    tokenizer/         the tokenizer, so a checkpoint exports on its own
A checkpoint is written into step_XXXXXXXX.tmp and renamed when complete: a directory without
the .tmp suffix always has its meta.json. Names, not positions or stages, key every tensor, so a
checkpoint resumes in any other layout, and a rank reads only the shards that hold its names.
A new kind of shard (ZeRO's sharded optimizer state) is one more entry in meta["shards"].
Random state needs no saving: dropout is reseeded from (seed, step, rank) every step.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

from hvdllm.checkpoint.shards import (
    TRAIN_SHARD,
    CheckpointError,
    read_shard,
    shard_kind,
    write_shard,
)
from hvdllm.config import MAX_STEPS

STEP_DIR = re.compile(r"^step_(\d{8})$")


class Checkpoint:
    """One complete checkpoint directory, opened by its meta.json."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        try:
            self.meta: dict = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} is not a complete hvdllm checkpoint "
                                  f"(no meta.json)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{meta_path} cannot be read: {e}") from None
        if not isinstance(self.meta, dict) or not isinstance(self.meta.get("step"), int) \
                or not isinstance(self.meta.get("model_config"), dict):
            raise CheckpointError(f"{meta_path} is not an hvdllm checkpoint's meta "
                                  f"(no step or model_config)")

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def entries(self, kind: str) -> dict[str, dict | None]:
        """Shard name -> its meta entry, for one kind (entries are None in older checkpoints,
        which recorded no checksums)."""
        if "shards" in self.meta:
            return {n: e for n, e in self.meta["shards"].items() if shard_kind(n) == kind}
        return {p.name: None for p in sorted(self.path.glob(f"{kind}_stage*.pt"))}

    def load_shards(self, kind: str, wanted: Iterable[str], aliases: dict[str, str]) -> list[dict]:
        """The shards of one kind that hold one of the `wanted` names (a name may be found
        under its tied alias), read and verified; the others are not opened."""
        wanted = set(wanted)
        keys = wanted | {aliases[n] for n in wanted if n in aliases}
        entries = self.entries(kind)
        if not entries:
            raise CheckpointError(f"{self.path} holds no {kind} shards")
        return [read_shard(self.path, name, entry) for name, entry in entries.items()
                if entry is None or keys & set(entry["names"])]

    def load_named(self, kind: str, wanted: Iterable[str], aliases: dict[str, str]) -> dict:
        """The shards holding `wanted` names, merged into one dict by name."""
        merged: dict[str, Any] = {}
        for shard in self.load_shards(kind, wanted, aliases):
            merged.update(shard)
        return merged

    def load_train_state(self) -> dict:
        entry = self.meta.get("shards", {}).get(TRAIN_SHARD) if "shards" in self.meta else None
        return read_shard(self.path, TRAIN_SHARD, entry)


class CheckpointManager:
    """Names, writes, commits, prunes and finds the checkpoints of one run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"

    def path(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def tmp_path(self, step: int) -> Path:
        return self.path(step).with_suffix(".tmp")

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)
                      and (p / "meta.json").is_file())

    # -- writing (rank 0 begins and commits; each stage's first replica writes its shards) ----
    def begin(self, step: int) -> Path:
        """Create (or empty) the temporary directory a checkpoint is written into."""
        if step > MAX_STEPS:
            raise CheckpointError(f"step {step} does not fit a checkpoint name (at most {MAX_STEPS})")
        for stale in self.root.glob("step_*.tmp") if self.root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)  # left by a run that died mid-save
        tmp = self.tmp_path(step)
        tmp.mkdir(parents=True)
        return tmp

    def write_shards(self, step: int, shards: dict[str, Any]) -> dict[str, dict]:
        """Write one rank's shards ({file name (shards.shard_name): object}); returns their
        meta entries by file name."""
        tmp = self.tmp_path(step)
        return {name: write_shard(tmp, name, obj) for name, obj in shards.items()}

    def commit(self, step: int, meta: dict, entries: dict[str, dict], train_state: dict,
               job_toml: str, tokenizer_dir: Path, keep: int) -> Path:
        """Finish a checkpoint: counters, meta (with every shard's entry), job, tokenizer, then
        the atomic rename; prune all but the newest `keep`."""
        tmp = self.tmp_path(step)
        entries = {**entries, TRAIN_SHARD: write_shard(tmp, TRAIN_SHARD, train_state)}
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        (tmp / "job.toml").write_text(job_toml)
        (tmp / "meta.json").write_text(json.dumps({**meta, "shards": entries}, indent=2) + "\n")
        final = self.path(step)
        if final.exists():  # the same step saved again (a resumed run): swap, then delete the old
            old = final.with_suffix(".old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        for old in self.complete()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def resume_candidates(run_dir: Path, resume: str | None) -> tuple[list[Path], bool]:
    """The checkpoints `--resume` may use, newest first, and whether one was named explicitly.

    None: start fresh. "auto": the run's checkpoints, or fresh if it has none. "latest" (plain
    --resume): the run's checkpoints, at least one. PATH: that checkpoint, or a run directory's.
    """
    if resume is None:
        return [], False
    if resume in ("auto", "latest"):
        found = CheckpointManager(run_dir).complete()[::-1]
        if not found and resume == "latest":
            raise CheckpointError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
        return found, False
    path = Path(resume)
    found = CheckpointManager(path).complete()[::-1]
    if found and not (path / "meta.json").exists():
        return found, False  # a run directory was given
    if not path.exists():
        raise CheckpointError(f"--resume {resume}: no such checkpoint or run directory")
    return [path], True
