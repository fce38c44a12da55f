"""Checkpoints: atomic save, keep-last-k, resume, loaded with weights_only=True.

Layout of run_dir/checkpoints/step_00000100/:
    model_stage{S}.pt  stage S's part of the model state_dict, under the full model's names
    optim_stage{S}.pt  stage S's optimizer state, keyed by parameter name (not position)
    train.pt           loss scaler and counters
    meta.json          step, layout (stages, replicas), tokenizer fingerprint, model config
    job.toml      the resolved job that wrote it
    tokenizer/    the tokenizer, so a checkpoint exports on its own
A checkpoint is written into step_XXXXXXXX.tmp and renamed when complete: a directory without
the .tmp suffix is always whole. Because names, not positions or stages, key everything, the
shards of any layout merge into the full model, and a checkpoint resumes in any other layout.
Random state needs no saving: dropout is reseeded from (seed, step, rank) every step.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from hvdllm.errors import UserError

STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)
                  and (p / "meta.json").is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def begin(run_dir: Path, step: int) -> Path:
    """Create (or empty) the temporary directory a checkpoint is written into."""
    tmp = checkpoint_dir(run_dir, step).with_suffix(".tmp")
    for stale in tmp.parent.glob("step_*.tmp") if tmp.parent.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)  # left by a run that died mid-save
    tmp.mkdir(parents=True)
    return tmp


def write_file(tmp: Path, name: str, obj: Any) -> None:
    torch.save(obj, tmp / name)


def commit(tmp: Path, meta: dict, job_toml: str, tokenizer_dir: Path, keep: int) -> Path:
    """Finish a checkpoint: meta, job, tokenizer, then the atomic rename; prune old ones."""
    shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    (tmp / "job.toml").write_text(job_toml)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    final = tmp.with_suffix("")
    if final.exists():  # the same step saved again (a resumed run): swap, then delete the old
        old = final.with_suffix(".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    for old in list_checkpoints(final.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(ckpt: Path) -> dict:
    if not (ckpt / "meta.json").is_file():
        raise UserError(f"{ckpt} is not a complete hvdllm checkpoint (no meta.json)")
    return json.loads((ckpt / "meta.json").read_text())


def load_file(ckpt: Path, name: str) -> Any:
    """torch.load with weights_only=True: tensors and plain containers only, never code."""
    return torch.load(ckpt / name, map_location="cpu", weights_only=True)


def resolve(run_dir: Path, resume: str | None) -> Path | None:
    """--resume (latest in run_dir), --resume auto (latest if any), --resume PATH, or None."""
    if resume is None or (resume == "auto" and latest_checkpoint(run_dir) is None):
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    if resume == "latest":
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise UserError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
        return ckpt
    ckpt = Path(resume)
    if not (ckpt / "meta.json").is_file() and latest_checkpoint(ckpt) is not None:
        ckpt = latest_checkpoint(ckpt)  # a run directory was given
    read_meta(ckpt)
    return ckpt


# Aliases for GPT-2's tied weight: one process names it after the embedding, a last pipeline
# stage (which holds only the head) after the head.
TIED_ALIASES = {"lm_head.weight": "transformer.wte.weight", "transformer.wte.weight": "lm_head.weight"}


def merged_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """All stages' shards of a checkpoint merged into the full model's state dict."""
    state: dict[str, torch.Tensor] = {}
    shards = sorted(ckpt.glob("model_stage*.pt"))
    if not shards:
        raise UserError(f"{ckpt} holds no model_stage*.pt files")
    for shard in shards:
        state.update(load_file(ckpt, shard.name))
    return state


def select_state(merged: dict[str, torch.Tensor], wanted: list[str]) -> dict[str, torch.Tensor]:
    """The entries a (stage) module wants, by name, from a merged state dict."""
    out = {}
    for name in wanted:
        key = name if name in merged else TIED_ALIASES.get(name, name)
        if key not in merged:
            raise UserError(f"checkpoint has no tensor for {name!r}: was it written by another model?")
        out[name] = merged[key]
    return out


def named_optimizer_state(optimizer: torch.optim.Optimizer,
                          named_params: list[tuple[str, torch.nn.Parameter]]) -> dict[str, dict]:
    """The optimizer's per-parameter state keyed by parameter name."""
    return {name: dict(optimizer.state[p]) for name, p in named_params if p in optimizer.state}


def load_named_optimizer_state(optimizer: torch.optim.Optimizer,
                               named_params: list[tuple[str, torch.nn.Parameter]],
                               merged: dict[str, dict]) -> None:
    """Put saved per-parameter state back, matching parameters by name (any layout)."""
    for name, p in named_params:
        key = name if name in merged else TIED_ALIASES.get(name, name)
        if key in merged:
            optimizer.state[p] = {k: v.clone() if torch.is_tensor(v) else v
                                  for k, v in merged[key].items()}
