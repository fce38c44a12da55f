"""Activation checkpointing of decoder blocks, and counting the activation bytes kept for backward.

Checkpointing a block keeps only its input during forward and recomputes the block during
backward (torch's non-reentrant checkpoint), trading one more block forward for the block's
intermediate activations. The recomputation restores the RNG state the first forward saw, so
dropout draws the same masks: losses and gradients equal the run without checkpointing.

Which blocks: with `training.activation_checkpointing = "blocks"` and
`training.checkpoint_every_blocks = k`, the blocks whose global index i (0-based, in the full
model) satisfies i % k == 0. Global indices make every pipeline layout checkpoint the same blocks.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint


def checkpointed_blocks(mode: str, every: int, n_layer: int) -> frozenset[int]:
    """Global indices of the blocks to checkpoint: none, or those with index % every == 0."""
    if mode == "none":
        return frozenset()
    if mode != "blocks":
        raise ValueError(f"activation checkpointing {mode!r}: expected 'none' or 'blocks'")
    if every < 1:
        raise ValueError(f"checkpoint every {every} blocks: must be >= 1")
    return frozenset(range(0, n_layer, every))


def run_checkpointed(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """fn(*args), keeping only its inputs for backward and recomputing it there (same RNG)."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)


class SavedActivations:
    """Counts the bytes autograd keeps for backward while active (a saved_tensors_hooks context).

    Each distinct storage is counted once, at its full size (a saved view keeps its whole base
    alive). Parameters' own storages are not activations and are left out when `exclude` holds
    them; copies of parameters (e.g. autocast's bf16 weight casts) are counted, since they are
    kept per forward. Inside a checkpointed block torch's own hooks take over, so only what the
    checkpoint keeps (the block's inputs) is counted for it. Count one forward at a time: a
    storage freed by an earlier backward may be reused at the same address and not be counted.
    """

    def __init__(self, exclude: Any = ()) -> None:
        self.bytes = 0
        self.tensors = 0
        self._seen: set[tuple[str, int]] = {self._key(p) for p in exclude}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @staticmethod
    def _key(t: torch.Tensor) -> tuple[str, int]:
        return str(t.device), t.untyped_storage().data_ptr()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = self._key(t)
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
            self.tensors += 1
        return t

    def __enter__(self) -> SavedActivations:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
