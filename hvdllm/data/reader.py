"""Deterministic training windows from memory-mapped token shards.

The tokens are a numpy array or hvdllm.data.index.ShardedTokens (a split's memory-mapped
shards read as one sequence; a window may cross a shard boundary), so offsets mean the same
whatever the shard layout.

Every optimizer step draws one *global* batch of `global_batch_size` windows, each
`seq_len + 1` tokens long, at offsets chosen by a generator seeded with (seed, step). A rank
takes its own slice of that batch, so:
  - the union over ranks is the same global batch on every layout (1 rank, N ranks, pipelines),
    which is what makes loss and gradient parity between layouts testable;
  - ranks never share a window within a step;
  - resuming at step k reproduces exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from hvdllm.errors import UserError

if TYPE_CHECKING:
    from hvdllm.data.index import ShardedTokens


class TokenReader:
    def __init__(self, tokens: np.ndarray | ShardedTokens, seq_len: int, global_batch_size: int, seed: int) -> None:
        if tokens.size < seq_len + 2:
            raise UserError(f"only {tokens.size} tokens: too few for windows of {seq_len + 1}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.seed = seed

    def global_offsets(self, step: int) -> np.ndarray:
        """Start offsets of the step's global batch (same on every rank)."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, self.tokens.size - self.seq_len - 1, size=self.global_batch_size)

    def micro_batch(self, step: int, replica: int, micro: int, micro_batch_size: int,
                    replicas: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) for one micro-batch of one data-parallel replica.

        Sample j of the global batch belongs to micro-batch `micro` of replica `replica` when
        j // micro_batch_size == micro * replicas + replica.
        """
        first = (micro * replicas + replica) * micro_batch_size
        offsets = self.global_offsets(step)[first:first + micro_batch_size]
        if len(offsets) != micro_batch_size:
            raise IndexError(f"micro-batch {micro} of replica {replica} lies outside the global batch")
        return self._windows(offsets)

    def _windows(self, offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = offsets[:, None] + np.arange(self.seq_len + 1)[None, :]
        w = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return w[:, :-1], w[:, 1:]

    def eval_batches(self, n_batches: int, replica: int, replicas: int,
                     micro_batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed, non-overlapping validation windows, split across replicas (same every eval)."""
        n_windows = (self.tokens.size - 1) // (self.seq_len + 1)
        total = min(n_batches * self.global_batch_size, n_windows)
        mine = np.arange(total)[replica::replicas] * (self.seq_len + 1)
        return [self._windows(mine[i:i + micro_batch_size])
                for i in range(0, len(mine), micro_batch_size)]
