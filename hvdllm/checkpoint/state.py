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
        if key in merged:  # elementwise state may arrive flat (from ZeRO-1 segments)
            optimizer.state[p] = {k: (v.reshape(p.shape).clone() if v.dim() else v.clone())
                                  if torch.is_tensor(v) else v for k, v in merged[key].items()}


def merge_optimizer_shards(shards: list[dict[str, dict]]) -> dict[str, dict]:
    """Full per-parameter state from optimizer shards of any layout.

    Plain shards hold whole entries. ZeRO-1 shards hold segments ("zero_segment": [start,
    length] of the flattened parameter): a parameter's segments from all replicas are put back
    in order, elementwise state concatenated flat and scalar state (Adam's step) taken once.
    """
    whole: dict[str, dict] = {}
    pieces: dict[str, list[dict]] = {}
    for shard in shards:
        for name, entry in shard.items():
            if "zero_segment" in entry:
                pieces.setdefault(name, []).append(entry)
            else:
                whole[name] = entry
    for name, parts in pieces.items():
        parts.sort(key=lambda e: e["zero_segment"][0])
        merged = {}
        for key in parts[0]:
            if key == "zero_segment":
                continue
            values = [e[key] for e in parts if key in e]
            tensor = torch.is_tensor(values[0]) and values[0].dim() > 0
            merged[key] = torch.cat([v.flatten() for v in values]) if tensor else values[0]
        whole[name] = merged
    return whole
