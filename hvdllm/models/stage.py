"""Cutting a causal LM into pipeline stages, and running one stage.

Every rank builds the model with the same seed (so every layout starts from the same weights as
one process would), then keeps only its stage's parts:
    first stage:  the embeddings (spec.embedding_parts)
    every stage:  its contiguous run of decoder blocks
    last stage:   the final norm and the output head (the loss is computed by the caller)
Parts a stage does not own are removed from the module tree, so parameter and state_dict names
stay those of the full model ("transformer.h.3.attn.c_attn.weight"): shards of any layout merge
into one full state dict, and a checkpoint loads into any other layout.

When the head is tied to the token embedding (GPT-2, tied Qwen2) and P > 1, the first and last
stage each hold a copy of that weight; the training loop sums its gradient between them every
step so the copies stay identical.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from hvdllm.errors import UserError
from hvdllm.models.activations import run_checkpointed
from hvdllm.models.spec import ModelSpec, spec_for


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


def partition_for(model: PreTrainedModel, stages: int, explicit: list[int] | None = None
                  ) -> list[range]:
    """Block ranges per stage: the job's explicit counts, or balanced by parameter cost."""
    blocks = spec_for(model.config.model_type).blocks(model)
    if explicit:
        counts = list(explicit)
    else:
        block_cost = float(sum(p.numel() for p in blocks[0].parameters()))
        head = model.get_output_embeddings().weight.numel()
        counts = balanced_partition(len(blocks), stages, block_cost, first_extra=0.0,
                                    last_extra=float(head))
    starts = [sum(counts[:s]) for s in range(stages)]
    return [range(starts[s], starts[s] + counts[s]) for s in range(stages)]


class Stage:
    """One pipeline stage of a causal LM: forward(token ids or activations) -> activations or logits."""

    def __init__(self, model: PreTrainedModel, layers: range, first: bool, last: bool) -> None:
        self.spec: ModelSpec = spec_for(model.config.model_type)
        self.model, self.layers, self.first, self.last = model, layers, first, last
        self.tied = self.spec.tied_names(model.config)
        if not (first and last):
            self._trim()

    def _trim(self) -> None:
        blocks = self.spec.blocks(self.model)
        for i in range(len(blocks)):
            if i not in self.layers:
                blocks[i] = nn.Identity()  # keeps the indices (and names) of the kept blocks
        base = self.spec.base(self.model)
        if not self.first:
            for part in self.spec.embedding_parts:
                setattr(base, part, None)
        if not self.last:
            self.model.lm_head = None
            for part in self.spec.final_parts:
                setattr(base, part, None)

    @property
    def tied_weight(self) -> nn.Parameter | None:
        """The embedding/head weight shared by the first and last stage, if the model is split."""
        if not self.tied or self.first == self.last:
            return None
        name = self.tied[0] if self.first else self.tied[1]
        return self.model.get_parameter(name)

    checkpointed: frozenset[int] = frozenset()
    """Global indices of the blocks recomputed in backward (activations.checkpointed_blocks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same computation as the full model's forward, restricted to this stage.

        In training (model.training, grad enabled) the blocks in `checkpointed` keep only their
        input for backward and are recomputed there; evaluation never checkpoints.
        """
        positions = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        hidden = self.spec.embed(self.model, x, positions) if self.first else x
        inputs = self.spec.block_inputs(self.model, hidden, positions)
        training = self.model.training and torch.is_grad_enabled()
        for i in self.layers:
            if training and i in self.checkpointed:
                hidden = run_checkpointed(self.spec.run_block, self.model, i, hidden, inputs)
            else:
                hidden = self.spec.run_block(self.model, i, hidden, inputs)
        return self.spec.head(self.model, hidden) if self.last else hidden
