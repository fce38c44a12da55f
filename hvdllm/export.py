"""`hvdllm export` and `hvdllm generate`: checkpoints to Hugging Face folders, and sampling."""

from __future__ import annotations

import shutil
from pathlib import Path

from hvdllm import checkpoint
from hvdllm.errors import UserError
from hvdllm.log import logger
from hvdllm.model import load_state_into_hf_model


def export(source: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face model + tokenizer folder from a checkpoint or a run directory."""
    ckpt = checkpoint.resolve(Path(source), str(source))
    out = Path(out_dir)
    model = load_state_into_hf_model(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in (ckpt / "tokenizer").iterdir():
        shutil.copy2(f, out / f.name)
    logger.info("exported %s -> %s", ckpt, out)
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
