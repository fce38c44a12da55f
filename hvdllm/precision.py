"""Mixed precision: autocast contexts and a dynamic loss scale that every rank agrees on."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast for bf16/fp16 (matmuls in low precision, reductions in fp32); fp32: no-op."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


class LossScaler:
    """Dynamic loss scaling for fp16, with the overflow decision taken by the whole world.

    The loss is multiplied by `scale` before backward so small fp16 gradients do not flush to zero.
    After the all-reduce, gradients are divided by the scale and checked for inf/NaN. The check
    is then reduced (MAX over the world) so that every rank - every replica and, with
    pipelines, every stage, each of which holds different parameters - skips the same steps and
    keeps the same scale. On overflow the scale halves; after `growth_interval` clean steps it doubles.
    With fp32/bf16 the scaler is disabled and costs nothing, unless check_overflow asks for the
    agreed inf/NaN check alone (fp16 gradient compression): then overflowing steps are skipped
    at a fixed scale of 1.
    """

    def __init__(self, enabled: bool, initial_scale: float = 65536.0, growth_interval: int = 200,
                 world_max: Callable[[float], float] | None = None,
                 check_overflow: bool = False) -> None:
        self.enabled = enabled
        self.check_overflow = enabled or check_overflow
        self.scale = float(initial_scale) if enabled else 1.0
        self.growth_interval = growth_interval
        self.clean_steps = 0
        self.world_max = world_max

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale_and_check(self, params: Iterable[torch.nn.Parameter]) -> bool:
        """Divide gradients by the scale; return True when any rank saw inf/NaN (skip the step)."""
        if not self.check_overflow:
            return False
        grads = [p.grad for p in params if p.grad is not None]
        local_overflow = False
        if self.enabled:
            inv = 1.0 / self.scale
            for g in grads:
                g.mul_(inv)
        if grads:
            local_overflow = not bool(torch.stack([g.float().abs().max() for g in grads]).isfinite().all())
        # Every rank must take the same decision, or replicas (and stages) would drift apart.
        return bool(self.world_max(float(local_overflow))) if self.world_max else local_overflow

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale = max(self.scale / 2.0, 1.0)
            self.clean_steps = 0
        else:
            self.clean_steps += 1
            if self.clean_steps >= self.growth_interval:
                self.scale *= 2.0
                self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
