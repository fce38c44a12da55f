"""`hvdllm export` and `hvdllm generate`: checkpoints to Hugging Face folders, and sampling.

An export folder holds what `from_pretrained` loads (config, weights, tokenizer) and
`hvdllm-export.json` (which checkpoint it came from). Export writes only into a new or empty
folder or over an earlier export, never among other files; it is written beside the target and
swapped in when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hvdllm.checkpoint import (
    Checkpoint,
    CheckpointError,
    resume_candidates,
    select_state,
    tied_aliases,
)
from hvdllm.errors import UserError
from hvdllm.log import logger

MARKER = "hvdllm-export.json"


def check_export_target(out: Path) -> None:
    """Refuse a target that is a file, inside a checkpoint, or a folder of other files."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; export needs a new or empty folder")
    if any(p.name == "checkpoints" for p in [out.resolve(), *out.resolve().parents]):
        raise UserError(f"{out} is inside a run's checkpoints/ folder; export elsewhere")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"{out} is not empty and is not an earlier export; choose a new folder")


def load_checkpoint_model(ckpt: Checkpoint):
    """The full Hugging Face model of a checkpoint (all stages' shards merged by name)."""
    from hvdllm.models import model_from_config, spec_for

    model = model_from_config(ckpt.meta["model_config"])
    aliases = tied_aliases(spec_for(model.config.model_type).tied_names(model.config))
    wanted = list(model.state_dict())
    model.load_state_dict(select_state(ckpt.load_named("model", wanted, aliases), wanted, aliases))
    return model.eval()


def export(source: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face model + tokenizer folder from a checkpoint or a run directory."""
    out = Path(out_dir)
    check_export_target(out)
    candidates, _ = resume_candidates(Path(source), str(source))
    if not candidates:
        raise CheckpointError(f"{source} holds no checkpoint")
    ckpt = Checkpoint(candidates[0])
    model = load_checkpoint_model(ckpt)
    tmp = out.with_name(out.name + ".export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in (ckpt.path / "tokenizer").iterdir():
        shutil.copy2(f, tmp / f.name)
    (tmp / MARKER).write_text(json.dumps({"checkpoint": str(ckpt.path.resolve()),
                                          "step": ckpt.step}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)  # empty, or an earlier export (check_export_target)
    tmp.rename(out)
    logger.info("exported %s (step %d) -> %s", ckpt.path, ckpt.step, out)
    return out


def generate(model_dir: str | Path, prompt: str, max_new_tokens: int = 64,
             temperature: float = 0.8, seed: int = 0) -> str:
    """Sample a continuation of `prompt` from an exported model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not an exported model (no config.json); "
                         f"run: hvdllm export RUN_DIR {model_dir}")
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
    torch.manual_seed(seed)
    inputs = tok(prompt, return_tensors="pt")
    limit = model.config.max_position_embeddings if hasattr(model.config, "max_position_embeddings") \
        else model.config.n_positions
    max_new_tokens = max(1, min(max_new_tokens, limit - inputs["input_ids"].shape[1]))
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None,
                             pad_token_id=tok.eos_token_id)
    return tok.decode(out[0], skip_special_tokens=True)
