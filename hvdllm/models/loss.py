"""The training loss, in one place: next-token cross-entropy over the last stage's logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (batch, seq, vocab) logits against (batch, seq) next tokens.

    Computed in fp32 whatever the autocast dtype: a bf16 log-softmax over a large vocabulary
    loses the digits that make losses comparable between layouts.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
