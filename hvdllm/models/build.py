"""Building a model: fresh from the job's sizes, or a local pretrained Hugging Face folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Never reach for the hub: every model and tokenizer comes from a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel  # noqa: E402

from hvdllm.config import ModelConfig  # noqa: E402
from hvdllm.errors import UserError  # noqa: E402
from hvdllm.models.spec import spec_for  # noqa: E402


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, seed: int) -> PreTrainedModel:
    """A fresh model with seeded init, or the local pretrained one named by cfg.pretrained."""
    if cfg.pretrained:
        return load_pretrained(Path(cfg.pretrained), vocab_size)
    spec = spec_for(cfg.family)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(spec.hf_config(cfg, vocab_size, seq_len),
                                            attn_implementation="sdpa", dtype=torch.float32)


def pretrained_model_type(path: Path) -> str:
    """The model_type of a local Hugging Face folder, or UserError saying what is wrong with it."""
    config = path / "config.json"
    if not config.is_file():
        raise UserError(f"model.pretrained {str(path)!r} is not a Hugging Face model directory "
                        f"(no config.json)")
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config} is not a JSON model config: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise UserError(f"{config} is not a model config (no \"model_type\")")
    spec_for(raw["model_type"])  # refuses families hvdllm cannot cut into stages
    return raw["model_type"]


def load_pretrained(path: Path, vocab_size: int) -> PreTrainedModel:
    """A local pretrained causal LM in fp32, checked against the tokenizer's vocabulary."""
    pretrained_model_type(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True,
                                                     dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"model.pretrained {str(path)!r} cannot be loaded: "
                        f"{str(e).splitlines()[0]}") from None
    rows = model.get_input_embeddings().num_embeddings
    if rows < vocab_size:
        raise UserError(f"pretrained model has {rows} token embeddings but the tokenizer has "
                        f"{vocab_size} tokens")
    return model


def model_from_config(config: dict) -> PreTrainedModel:
    """An (untrained) model of a saved config dict, e.g. a checkpoint's meta["model_config"]."""
    cfg = dict(config)
    hf_cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model: PreTrainedModel, seq_len: int) -> float:
    """Training FLOPs per token of the whole model (see ModelSpec.flops_per_token)."""
    return spec_for(model.config.model_type).flops_per_token(model, seq_len)
