"""Hugging Face causal LMs: build from the job, load a local pretrained model, count FLOPs, export."""

from __future__ import annotations

import os
from pathlib import Path

# Never reach for the hub: every model and tokenizer comes from a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel  # noqa: E402

from hvdllm.config import ModelConfig  # noqa: E402
from hvdllm.errors import UserError  # noqa: E402


def _llama_intermediate(cfg: ModelConfig) -> int:
    return cfg.intermediate_size or 64 * ((8 * cfg.n_embd // 3 + 63) // 64)


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, seed: int) -> PreTrainedModel:
    """A fresh model with seeded init, or the local pretrained one named by cfg.pretrained."""
    if cfg.pretrained:
        if not Path(cfg.pretrained, "config.json").is_file():
            raise UserError(f"model.pretrained {cfg.pretrained!r} is not a Hugging Face model "
                             f"directory (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(cfg.pretrained, local_files_only=True,
                                                     dtype=torch.float32)
        if model.get_input_embeddings().num_embeddings < vocab_size:
            raise UserError(f"pretrained model has {model.get_input_embeddings().num_embeddings} "
                             f"token embeddings but the tokenizer has {vocab_size} tokens")
        return model
    if cfg.family == "gpt2":
        hf_cfg = GPT2Config(vocab_size=vocab_size, n_positions=seq_len, n_embd=cfg.n_embd,
                            n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout,
                            embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                            bos_token_id=0, eos_token_id=0)
    else:
        hf_cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.n_embd,
                             intermediate_size=_llama_intermediate(cfg),
                             num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                             num_key_value_heads=cfg.n_kv_head or cfg.n_head,
                             max_position_embeddings=seq_len, tie_word_embeddings=False,
                             bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa",
                                            dtype=torch.float32)


def flops_per_token(model: PreTrainedModel, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + the attention term 12 x L x d x T.

    Matmul parameters exclude lookup tables that do no multiply-adds: position embeddings and,
    when the head is not tied to it, the input embedding.
    """
    n = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    if emb is not head:
        n -= emb.numel()
    wpe = getattr(getattr(model, "transformer", None), "wpe", None)
    if wpe is not None:
        n -= wpe.weight.numel()
    c = model.config
    return 6.0 * n + 12.0 * c.num_hidden_layers * c.hidden_size * seq_len


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_state_into_hf_model(ckpt: Path) -> PreTrainedModel:
    """An HF model rebuilt from a checkpoint's saved config and weights (weights_only load)."""
    import json

    from transformers import AutoConfig

    meta = json.loads((ckpt / "meta.json").read_text())
    cfg = dict(meta["model_config"])
    hf_cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    from hvdllm.checkpoint import merged_model_state, select_state

    merged = merged_model_state(ckpt)  # the shards of every pipeline stage, by full names
    model.load_state_dict(select_state(merged, list(model.state_dict())))
    return model.eval()
