"""Cutting a Hugging Face causal LM into pipeline stages.

Every rank builds the whole model with the same seed (so every layout starts from the same
weights as one process would), then keeps only its stage's parts:
    first stage:  token (and GPT-2 position) embeddings
    every stage:  its contiguous run of decoder blocks
    last stage:   final norm, output head (and the loss, computed by the caller)
Parts a stage does not own are removed from the module tree, so parameter and state_dict names
stay those of the full model ("transformer.h.3.attn.c_attn.weight"): shards of any layout merge
into one full state dict, and a checkpoint loads into any other layout.

GPT-2 ties the output head to the token embedding. With P > 1 the first and last stage each hold
a copy of that weight; the training loop sums its gradient between them every step (see
parallel/pipeline.py) so the copies stay identical.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from hvdllm.errors import UserError


def balanced_partition(n_layer: int, stages: int, block_cost: float, first_extra: float,
                       last_extra: float) -> list[int]:
    """Blocks per stage minimising the most expensive stage (exact, by dynamic programming).

    Stage cost = its blocks x block_cost, plus first_extra on the first stage and last_extra on
    the last (embedding and head/loss work).
    """
    if stages > n_layer:
        raise UserError(f"{stages} pipeline stages but only {n_layer} layers: every stage needs one")
    inf = float("inf")
    # best[s][k]: (cost of the worst stage, counts) for the first k blocks on stages 0..s
    best: list[list[tuple[float, list[int]]]] = [[(inf, [])] * (n_layer + 1) for _ in range(stages)]
    for k in range(1, n_layer + 1):
        best[0][k] = (k * block_cost + first_extra + (last_extra if stages == 1 else 0), [k])
    for s in range(1, stages):
        extra = last_extra if s == stages - 1 else 0.0
        for k in range(s + 1, n_layer + 1):
            for j in range(s, k):
                prev_cost, prev_counts = best[s - 1][j]
                cost = max(prev_cost, (k - j) * block_cost + extra)
                if cost < best[s][k][0]:
                    best[s][k] = (cost, prev_counts + [k - j])
    return best[stages - 1][n_layer][1]


def partition_for(model: nn.Module, stages: int, explicit: list[int] | None = None) -> list[range]:
    """Block ranges per stage: the job's explicit counts, or balanced by parameter cost."""
    blocks = decoder_blocks(model)
    if explicit:
        counts = list(explicit)
    else:
        block_cost = float(sum(p.numel() for p in blocks[0].parameters()))
        head = model.get_output_embeddings().weight.numel()
        counts = balanced_partition(len(blocks), stages, block_cost, first_extra=0.0,
                                    last_extra=float(head))
    starts = [sum(counts[:s]) for s in range(stages)]
    return [range(starts[s], starts[s] + counts[s]) for s in range(stages)]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    if model.config.model_type == "gpt2":
        return model.transformer.h
    return model.model.layers


class Stage:
    """One pipeline stage of a causal LM: forward(input ids or activations) -> activations or logits."""

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool) -> None:
        self.family = model.config.model_type
        if self.family not in ("gpt2", "llama"):
            raise UserError(f"pipeline stages support gpt2 and llama models, not {self.family}")
        self.model, self.layers, self.first, self.last = model, layers, first, last
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))
        if not (first and last):
            self._trim()

    def _trim(self) -> None:
        blocks = decoder_blocks(self.model)
        for i in range(len(blocks)):
            if i not in self.layers:
                blocks[i] = nn.Identity()  # keeps the indices (and names) of the kept blocks
        base = self.model.transformer if self.family == "gpt2" else self.model.model
        if not self.first:
            if self.family == "gpt2":
                base.wte, base.wpe = None, None
            else:
                base.embed_tokens = None
        if not self.last:
            self.model.lm_head = None
            if self.family == "gpt2":
                base.ln_f = None
            else:
                base.norm = None

    @property
    def tied_weight(self) -> nn.Parameter | None:
        """The embedding/head weight shared by the first and last stage (GPT-2), if split."""
        if not self.tied or self.first == self.last:
            return None
        return self.model.transformer.wte.weight if self.first else self.model.lm_head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same computation as the full model's forward, restricted to this stage."""
        if self.family == "gpt2":
            return self._forward_gpt2(x)
        return self._forward_llama(x)

    def _positions(self, seq_len: int, device: torch.device) -> torch.Tensor:
        return torch.arange(seq_len, device=device).unsqueeze(0)

    def _forward_gpt2(self, x: torch.Tensor) -> torch.Tensor:
        t = self.model.transformer
        pos = self._positions(x.shape[1], x.device)
        h = t.drop(t.wte(x) + t.wpe(pos)) if self.first else x
        mask = create_causal_mask(config=self.model.config, inputs_embeds=h, attention_mask=None,
                                  cache=None, position_ids=pos)
        for i in self.layers:
            h = _tensor(t.h[i](h, None, mask, None, use_cache=False, position_ids=pos))
        if not self.last:
            return h
        return self.model.lm_head(t.ln_f(h))

    def _forward_llama(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model.model
        pos = self._positions(x.shape[1], x.device)
        h = m.embed_tokens(x) if self.first else x
        mask = create_causal_mask(config=self.model.config, inputs_embeds=h, attention_mask=None,
                                  cache=None, position_ids=pos)
        rope = m.rotary_emb(h, position_ids=pos)
        for i in self.layers:
            h = _tensor(m.layers[i](h, attention_mask=mask, position_embeddings=rope,
                                    position_ids=pos, use_cache=False))
        if not self.last:
            return h
        return self.model.lm_head(m.norm(h))


def _tensor(out) -> torch.Tensor:
    """Decoder blocks return a tensor (transformers >= 5) or a tuple starting with one."""
    return out[0] if isinstance(out, tuple) else out
