"""Peak resident memory of building one rank's stage, in a process of its own.

Usage: build_memory.py FAMILY N_LAYER N_EMBD STAGES STAGE. Prints one JSON line: the growth of
the process's peak RSS (bytes) while building, and the stage's parameter bytes.
"""
import json
import sys
from pathlib import Path

import torch

from hvdllm.config import ModelConfig
from hvdllm.models import Stage, empty_model, fill_weights, model_config, partition_for


def status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc (Linux; kB there)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> int:
    """Reset the peak RSS to the current RSS (writing 5 to clear_refs) and return it, so an
    earlier transient peak (imports) cannot hide the build's own growth."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_bytes("VmRSS")


family, n_layer, n_embd, stages, stage = sys.argv[1], *map(int, sys.argv[2:])
cfg = ModelConfig(family=family, n_layer=n_layer, n_embd=n_embd, n_head=8)
torch.zeros(1)  # the allocator and torch's own start-up are not the model's
before = reset_peak()
model = empty_model(model_config(cfg, 8192, 128))
layers = partition_for(model, stages)
part = Stage(model, layers[stage], stage == 0, stage == stages - 1)
fill_weights(part.model, cfg, seed=1)
params = sum(p.numel() * p.element_size() for p in part.model.parameters())
print(json.dumps({"peak_growth": status_bytes("VmHWM") - before, "param_bytes": params}))
