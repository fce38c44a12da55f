"""GPT-2: learned position embeddings, LayerNorm, the head tied to the token embedding."""

from __future__ import annotations

import math

import torch
from transformers import GPT2Config, PretrainedConfig, PreTrainedModel

from hvdllm.config import ModelConfig
from hvdllm.models.spec import FULL, BlockInputs, ModelSpec, attention_mask, block_output, register


class GPT2Spec(ModelSpec):
    family = "gpt2"
    base_attr, blocks_attr = "transformer", "h"
    embedding_parts = ("wte", "wpe")
    final_parts = ("ln_f",)
    lookup_parts = ("wte", "wpe")

    def hf_config(self, cfg: ModelConfig, vocab_size: int, seq_len: int) -> PretrainedConfig:
        return GPT2Config(vocab_size=vocab_size, n_positions=seq_len, n_embd=cfg.n_embd,
                          n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout,
                          embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                          bos_token_id=0, eos_token_id=0)

    def init_rule(self, module, attr: str, name: str, config: PretrainedConfig) -> tuple[str, float]:
        """GPT-2's scheme: the residual projections (attention and MLP c_proj) start smaller,
        N(0, initializer_range / sqrt(2 x layers)), two residual paths per block."""
        if name.endswith("c_proj.weight"):
            return "normal", config.initializer_range / math.sqrt(2 * config.n_layer)
        return super().init_rule(module, attr, name, config)

    def embed(self, model: PreTrainedModel, tokens: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
        t = model.transformer
        return t.drop(t.wte(tokens) + t.wpe(positions))

    def block_inputs(self, model: PreTrainedModel, hidden: torch.Tensor,
                     positions: torch.Tensor) -> BlockInputs:
        mask = attention_mask(FULL, model.config, hidden, positions)
        return BlockInputs(positions, [mask] * model.config.num_hidden_layers)

    def run_block(self, model: PreTrainedModel, index: int, hidden: torch.Tensor,
                  inputs: BlockInputs) -> torch.Tensor:
        block = model.transformer.h[index]
        return block_output(block(hidden, None, inputs.masks[index], None, use_cache=False,
                                  position_ids=inputs.positions))


GPT2 = register(GPT2Spec())
