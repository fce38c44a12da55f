"""What a model family must provide: one small interface, one implementation per family.

Everything family-specific lives behind `ModelSpec`: the Hugging Face config built from the job's
sizes, where the decoder blocks and the embedding/head parts sit, how a stage runs (embed, the
inputs every block needs, one block, the head), which names are tied, and which parameters are
lookups rather than matmuls (for FLOPs). Pipeline stages, checkpoints, export and FLOPs are written
once against this interface; adding a family means adding one small spec module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from hvdllm.config import ModelConfig
from hvdllm.errors import UserError


@dataclass
class BlockInputs:
    """What every decoder block of a stage needs besides the hidden states (built once a pass)."""
    positions: torch.Tensor
    masks: list[Any] = field(default_factory=list)
    """The attention mask of each block, by block index (full causal or sliding window)."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Family-specific inputs shared by all blocks (Llama-likes: rotary cos/sin)."""


class ModelSpec:
    """One model family. Subclasses set the attribute names and implement the four steps."""

    family: str = ""
    base_attr: str = ""
    """Attribute of the causal LM holding the decoder (GPT-2: "transformer", Llama-likes: "model")."""
    blocks_attr: str = ""
    """Attribute of the base holding the decoder blocks."""
    embedding_parts: tuple[str, ...] = ()
    """Attributes of the base that only the first stage keeps (token/position embeddings)."""
    final_parts: tuple[str, ...] = ()
    """Attributes of the base that only the last stage keeps (the final norm)."""
    lookup_parts: tuple[str, ...] = ()
    """Attributes of the base that are pure lookups (no multiply-adds), excluded from FLOPs
    unless tied to the head."""

    # -- building -----------------------------------------------------------------------------
    def hf_config(self, cfg: ModelConfig, vocab_size: int, seq_len: int) -> PretrainedConfig:
        """The Hugging Face config of a fresh model with the job's sizes."""
        raise NotImplementedError

    def init_rule(self, module: nn.Module, attr: str, name: str,
                  config: PretrainedConfig) -> tuple[str, float]:
        """How parameter `name` starts: ("normal", std), ("ones", 0) or ("zeros", 0).

        Norm weights start at one and biases at zero; every matrix and embedding is drawn from
        N(0, initializer_range), as Hugging Face's own init does for these families.
        """
        if "norm" in type(module).__name__.lower():
            return ("ones", 0.0) if attr == "weight" else ("zeros", 0.0)
        if attr == "bias":
            return "zeros", 0.0
        return "normal", float(config.initializer_range)

    def rebuild_buffers(self, model: PreTrainedModel) -> None:
        """Recompute buffers that checkpoints do not hold, after materialising on a device."""

    # -- where things are ---------------------------------------------------------------------
    def base(self, model: PreTrainedModel) -> nn.Module:
        return getattr(model, self.base_attr)

    def blocks(self, model: PreTrainedModel) -> nn.ModuleList:
        return getattr(self.base(model), self.blocks_attr)

    def tied_names(self, config: PretrainedConfig) -> tuple[str, str] | None:
        """(embedding name, head name) when the head shares the token embedding's weight."""
        if not getattr(config, "tie_word_embeddings", False):
            return None
        return f"{self.base_attr}.{self.embedding_parts[0]}.weight", "lm_head.weight"

    # -- a stage's forward: embed -> block inputs -> blocks -> head -----------------------------
    def embed(self, model: PreTrainedModel, tokens: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def block_inputs(self, model: PreTrainedModel, hidden: torch.Tensor,
                     positions: torch.Tensor) -> BlockInputs:
        raise NotImplementedError

    def run_block(self, model: PreTrainedModel, index: int, hidden: torch.Tensor,
                  inputs: BlockInputs) -> torch.Tensor:
        raise NotImplementedError

    def head(self, model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
        final = getattr(self.base(model), self.final_parts[0])
        return model.lm_head(final(hidden))

    # -- accounting ---------------------------------------------------------------------------
    def flops_per_token(self, model: PreTrainedModel, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul parameters + the attention term 12 x L x d x T.

        Matmul parameters exclude lookup tables (token and position embeddings) unless the
        head is tied to the token embedding, whose weight then does the head's matmul.
        """
        n = sum(p.numel() for p in model.parameters())
        tied = self.tied_names(model.config)
        for i, part in enumerate(self.lookup_parts):
            if i == 0 and tied:
                continue
            n -= getattr(self.base(model), part).weight.numel()
        c = model.config
        return 6.0 * n + 12.0 * c.num_hidden_layers * c.hidden_size * seq_len


FULL, SLIDING = "full_attention", "sliding_attention"
"""Attention kinds, as Hugging Face names them in config.layer_types."""


def attention_mask(kind: str, config: PretrainedConfig, hidden: torch.Tensor,
                   positions: torch.Tensor) -> Any:
    """The causal (or sliding-window causal) mask Hugging Face's own forward would build.

    Arguments are positional on purpose: the fourth is `past_key_values` before transformers
    5.24 and `cache` from then on (None either way), which keeps 5.9 to 5.24 working.
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    build = create_sliding_window_causal_mask if kind == SLIDING else create_causal_mask
    return build(config, hidden, None, None, positions)


def block_output(out: Any) -> torch.Tensor:
    """Decoder blocks return a tensor (transformers >= 5) or a tuple starting with one."""
    return out[0] if isinstance(out, tuple) else out


_SPECS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    _SPECS[spec.family] = spec
    return spec


def spec_for(model_type: str) -> ModelSpec:
    """The spec of a Hugging Face model_type ("gpt2", "llama", "mistral", "qwen2")."""
    from hvdllm.models import gpt2, llama  # noqa: F401  (each module registers its specs)

    if model_type not in _SPECS:
        raise UserError(f"model type {model_type!r} is not supported; hvdllm trains "
                        f"{', '.join(sorted(_SPECS))}")
    return _SPECS[model_type]
