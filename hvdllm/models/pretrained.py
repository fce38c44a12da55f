"""A local pretrained folder's tensors, read for the names a stage keeps and nothing more."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedModel

from hvdllm.errors import UserError
from hvdllm.models.spec import ModelSpec


def safetensors_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the .safetensors file holding it (sharded index or a single file)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    raise UserError(f"model.pretrained {str(folder)!r} has no model.safetensors (or index); "
                    f"save it with save_pretrained(safe_serialization=True)")


@torch.no_grad()
def load_pretrained_tensors(model: PreTrainedModel, folder: Path, spec: ModelSpec) -> None:
    """Copy the folder's tensors into the (stage) model's materialised parameters and buffers,
    opening each file once and reading only the tensors the stage holds."""
    from safetensors import safe_open

    where = safetensors_files(folder)
    tied = spec.tied_names(model.config)
    aliases = {tied[1]: tied[0], tied[0]: tied[1]} if tied else {}
    targets = dict(model.state_dict(keep_vars=True))
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name in targets:
        key = name if name in where else aliases.get(name, name)
        if key not in where:
            raise UserError(f"model.pretrained {str(folder)!r} holds no tensor {name!r}")
        by_file.setdefault(where[key], []).append((name, key))
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name, key in names:
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(targets[name].shape):
                    raise UserError(f"{file}: {key} has shape {tuple(tensor.shape)}, the model "
                                    f"expects {tuple(targets[name].shape)}")
                targets[name].copy_(tensor)
