"""Initial weights that do not depend on the layout: each parameter from (seed, its full name).

A rank builds the model on the `meta` device (no memory), keeps its stage's parts, and only then
materialises them. Each parameter is drawn from a generator seeded by a stable hash (SHA-256,
not Python's salted `hash()`) of the run's seed and the parameter's canonical full name, on the
CPU, so every layout, every rank and every device gets the same numbers for the same name. A
tied head is keyed by the embedding's name, so the copies on the first and last stage start
identical. The distributions are each family's own rules (ModelSpec.init_rule), e.g. GPT-2's
residual projections scaled by 1/sqrt(2 x layers).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from transformers import PreTrainedModel

from hvdllm.models.spec import ModelSpec


def name_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from the run's seed and a parameter's canonical name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def shared_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Groups of (module, attribute) that hold the same Parameter object (tied weights)."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                places.setdefault(id(p), []).append((module, attr))
    return [group for group in places.values() if len(group) > 1]


def materialize(model: PreTrainedModel, spec: ModelSpec, device: torch.device | str = "cpu") -> None:
    """Allocate a meta-device model's (remaining) parameters on `device`, keeping ties, and
    recompute the buffers that are not saved (rotary frequencies); values are left undefined."""
    ties = shared_parameters(model)
    model.to_empty(device=device)
    for group in ties:  # to_empty replaces each place's tensor on its own: tie them again
        first_module, first_attr = group[0]
        for module, attr in group[1:]:
            setattr(module, attr, getattr(first_module, first_attr))
    spec.rebuild_buffers(model)


@torch.no_grad()
def init_parameters(model: PreTrainedModel, spec: ModelSpec, seed: int) -> None:
    """Set every parameter from (seed, canonical name) with the family's rule."""
    tied = spec.tied_names(model.config)
    for module_name, module in model.named_modules():
        for attr, p in module._parameters.items():
            if p is None:
                continue
            name = f"{module_name}.{attr}" if module_name else attr
            canonical = tied[0] if tied and name == tied[1] else name
            kind, std = spec.init_rule(module, attr, canonical, model.config)
            if kind == "ones":
                p.fill_(1.0)
            elif kind == "zeros":
                p.zero_()
            else:
                g = torch.Generator().manual_seed(name_seed(seed, canonical))
                p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=g))
