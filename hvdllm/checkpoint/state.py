"""Model and optimizer state by parameter name, so any layout loads any other's checkpoint."""

from __future__ import annotations

import torch

from hvdllm.checkpoint.shards import CheckpointError


def tied_aliases(tied: tuple[str, str] | None) -> dict[str, str]:
    """A tied weight's two names, each pointing at the other: one process saves it under the
    embedding's name, a last pipeline stage (which holds only the head) under the head's."""
    return {tied[0]: tied[1], tied[1]: tied[0]} if tied else {}


def select_state(merged: dict[str, torch.Tensor], wanted: list[str],
                 aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """The entries a (stage) module wants, by name, from a merged state dict."""
    out = {}
    for name in wanted:
        key = name if name in merged else aliases.get(name, name)
        if key not in merged:
            raise CheckpointError(f"checkpoint has no tensor for {name!r}: was it written by "
                                  f"another model?")
        out[name] = merged[key]
    return out


def named_optimizer_state(optimizer: torch.optim.Optimizer,
                          named_params: list[tuple[str, torch.nn.Parameter]]) -> dict[str, dict]:
    """The optimizer's per-parameter state keyed by parameter name."""
    return {name: dict(optimizer.state[p]) for name, p in named_params if p in optimizer.state}


def load_named_optimizer_state(optimizer: torch.optim.Optimizer,
                               named_params: list[tuple[str, torch.nn.Parameter]],
                               merged: dict[str, dict], aliases: dict[str, str]) -> None:
    """Put saved per-parameter state back, matching parameters by name (any layout)."""
    for name, p in named_params:
        key = name if name in merged else aliases.get(name, name)
        if key in merged:
            optimizer.state[p] = {k: v.clone() if torch.is_tensor(v) else v
                                  for k, v in merged[key].items()}
