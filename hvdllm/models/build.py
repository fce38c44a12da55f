"""Building a model: on the meta device first, then only what a rank keeps gets memory.

    empty_model(model_config(...))   the structure, no memory
    (cut to a stage: models/stage.py)
    fill_weights(...)                materialise and initialise by name, or load the
                                     pretrained folder's tensors for the names kept
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Never reach for the hub: every model and tokenizer comes from a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from hvdllm.config import ModelConfig  # noqa: E402
from hvdllm.errors import UserError  # noqa: E402
from hvdllm.models.init import init_parameters, materialize  # noqa: E402
from hvdllm.models.pretrained import load_pretrained_tensors  # noqa: E402
from hvdllm.models.spec import spec_for  # noqa: E402


def model_config(cfg: ModelConfig, vocab_size: int, seq_len: int) -> PretrainedConfig:
    """The Hugging Face config of the job's model: from its sizes, or the pretrained folder's."""
    if not cfg.pretrained:
        return spec_for(cfg.family).hf_config(cfg, vocab_size, seq_len)
    path = Path(cfg.pretrained)
    pretrained_model_type(path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"model.pretrained {str(path)!r}: config.json cannot be used: "
                        f"{str(e).splitlines()[0]}") from None
    if config.vocab_size < vocab_size:
        raise UserError(f"pretrained model has {config.vocab_size} token embeddings but the "
                        f"tokenizer has {vocab_size} tokens")
    return config


def empty_model(config: PretrainedConfig) -> PreTrainedModel:
    """The model's structure on the `meta` device: shapes and names, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                dtype=torch.float32)


def fill_weights(model: PreTrainedModel, cfg: ModelConfig, seed: int) -> None:
    """Materialise a meta model (or the stage left of it) on the CPU and give it its weights:
    the pretrained folder's tensors for the names it holds, or the seeded init by name."""
    spec = spec_for(model.config.model_type)
    materialize(model, spec)
    if cfg.pretrained:
        load_pretrained_tensors(model, Path(cfg.pretrained), spec)
    else:
        init_parameters(model, spec, seed)


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, seed: int) -> PreTrainedModel:
    """The whole model with its initial (or pretrained) weights, on the CPU."""
    model = empty_model(model_config(cfg, vocab_size, seq_len))
    fill_weights(model, cfg, seed)
    return model


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
