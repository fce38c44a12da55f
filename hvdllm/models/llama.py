"""Llama and the Llama-likes users fine-tune most: Mistral and Qwen2.

All three share the decoder layout (embed_tokens, layers with rotary attention, RMSNorm, an
lm_head); they differ in small ways, each a few lines below:
  * Mistral and Qwen2 can restrict attention to a sliding window of the last W tokens
    (`model.sliding_window`); Qwen2 says per layer which kind it uses (`config.layer_types`).
  * Qwen2 has biases on the q/k/v projections and can tie its head to the token embedding
    (`model.tie_embeddings`).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, MistralConfig, PretrainedConfig, PreTrainedModel, Qwen2Config

from hvdllm.config import ModelConfig
from hvdllm.models.spec import (
    FULL,
    SLIDING,
    BlockInputs,
    ModelSpec,
    attention_mask,
    block_output,
    register,
)

def intermediate_size(cfg: ModelConfig) -> int:
    """The MLP width: the job's, or about 8/3 x n_embd rounded up to a multiple of 64."""
    return cfg.intermediate_size or 64 * ((8 * cfg.n_embd // 3 + 63) // 64)


class LlamaSpec(ModelSpec):
    family = "llama"
    base_attr, blocks_attr = "model", "layers"
    embedding_parts = ("embed_tokens",)
    final_parts = ("norm",)
    lookup_parts = ("embed_tokens",)

    def common_sizes(self, cfg: ModelConfig, vocab_size: int, seq_len: int) -> dict:
        return dict(vocab_size=vocab_size, hidden_size=cfg.n_embd,
                    intermediate_size=intermediate_size(cfg), num_hidden_layers=cfg.n_layer,
                    num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head or cfg.n_head,
                    max_position_embeddings=seq_len, tie_word_embeddings=cfg.tie_embeddings,
                    bos_token_id=0, eos_token_id=0)

    def hf_config(self, cfg: ModelConfig, vocab_size: int, seq_len: int) -> PretrainedConfig:
        return LlamaConfig(**self.common_sizes(cfg, vocab_size, seq_len))

    def rebuild_buffers(self, model: PreTrainedModel) -> None:
        """The rotary frequencies are not saved: compute them again on the CPU."""
        with torch.device("cpu"):
            model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)

    def layer_types(self, config: PretrainedConfig) -> list[str]:
        """Each block's attention kind: Qwen2 lists them; Mistral windows all when it has one."""
        declared = getattr(config, "layer_types", None)
        if declared:
            return list(declared)
        window = getattr(config, "sliding_window", None)
        return [SLIDING if window else FULL] * config.num_hidden_layers

    def embed(self, model: PreTrainedModel, tokens: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
        return model.model.embed_tokens(tokens)

    def block_inputs(self, model: PreTrainedModel, hidden: torch.Tensor,
                     positions: torch.Tensor) -> BlockInputs:
        kinds = self.layer_types(model.config)
        masks = {kind: attention_mask(kind, model.config, hidden, positions) for kind in set(kinds)}
        rope = model.model.rotary_emb(hidden, position_ids=positions)
        return BlockInputs(positions, [masks[k] for k in kinds], {"rope": rope})

    def run_block(self, model: PreTrainedModel, index: int, hidden: torch.Tensor,
                  inputs: BlockInputs) -> torch.Tensor:
        layer = model.model.layers[index]
        return block_output(layer(hidden, attention_mask=inputs.masks[index],
                                  position_embeddings=inputs.extras["rope"],
                                  position_ids=inputs.positions, use_cache=False))


class MistralSpec(LlamaSpec):
    family = "mistral"

    def hf_config(self, cfg: ModelConfig, vocab_size: int, seq_len: int) -> PretrainedConfig:
        return MistralConfig(**self.common_sizes(cfg, vocab_size, seq_len),
                             sliding_window=cfg.sliding_window or None)


class Qwen2Spec(LlamaSpec):
    family = "qwen2"

    def hf_config(self, cfg: ModelConfig, vocab_size: int, seq_len: int) -> PretrainedConfig:
        # Qwen2 windows the layers from max_window_layers on; 0 windows every layer.
        return Qwen2Config(**self.common_sizes(cfg, vocab_size, seq_len),
                           use_sliding_window=cfg.sliding_window > 0,
                           sliding_window=cfg.sliding_window or None, max_window_layers=0)


LLAMA = register(LlamaSpec())
MISTRAL = register(MistralSpec())
QWEN2 = register(Qwen2Spec())
