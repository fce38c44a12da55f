"""Optimizers, learning-rate schedules (incl. the gradient-norm-adaptive rate) and clipping."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from hvdllm.config import OptimConfig


def decays(p: torch.nn.Parameter) -> bool:
    """Matrices (2 or more dimensions, embeddings included) decay; biases and norm weights not."""
    return p.dim() >= 2


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW/Adam/Adagrad/SGD with two groups: matrices decay, biases/norms/1-D weights do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return optimizer_for([p for p in params if decays(p)], [p for p in params if not decays(p)],
                         cfg, lr)


def optimizer_for(decay: list, no_decay: list, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """The job's optimizer over two groups of tensors: with and without weight decay."""
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr, eps=cfg.eps)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def scaled_peak_lr(cfg: OptimConfig, replicas: int) -> float:
    """The peak rate after optional scaling with the number of data-parallel replicas."""
    factor = {"none": 1.0, "linear": float(replicas), "sqrt": math.sqrt(replicas)}[cfg.lr_scaling]
    return cfg.lr * factor


class LRSchedule:
    """lr(step, grad_norm): linear warmup, then constant / linear / cosine decay, or gradnorm.

    gradnorm, the gradient-norm-adaptive rate, uses the global gradient norm |g| of the current
    step (after the all-reduce and unscaling, before clipping):

        lr = peak * (1 + beta * |g|^2 / (eps + |g|)) ** (-alpha)

    For small |g| the rate approaches the peak; for large |g| it falls like |g|^-alpha, which
    damps the steps that follow loss spikes. Warmup multiplies every schedule.
    The schedule is a pure function of its inputs, so resuming needs no state of its own.
    """

    def __init__(self, cfg: OptimConfig, peak_lr: float, total_steps: int) -> None:
        self.cfg = cfg
        self.peak = peak_lr
        self.total = total_steps

    def __call__(self, step: int, grad_norm: float | None = None) -> float:
        cfg = self.cfg
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.schedule == "gradnorm":
            g = 0.0 if grad_norm is None or not math.isfinite(grad_norm) else grad_norm
            return self.peak * warm * (1 + cfg.gradnorm_beta * g * g / (cfg.gradnorm_eps + g)) ** (-cfg.gradnorm_alpha)
        if cfg.schedule == "constant" or step < cfg.warmup_steps:
            return self.peak * warm
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, self.total - cfg.warmup_steps))
        floor = self.peak * cfg.min_lr_ratio
        if cfg.schedule == "linear":
            return self.peak - (self.peak - floor) * progress
        return floor + 0.5 * (self.peak - floor) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def global_grad_norm(params: Iterable[torch.nn.Parameter],
                     sum_over_stages: Callable[[float], float] | None = None) -> float:
    """L2 norm of all gradients. After a data-parallel all-reduce every replica holds the same
    gradients, so the local norm is global; with pipeline stages each stage holds a different
    part, so the squares are summed over the stages by `sum_over_stages`."""
    grads = [p.grad for p in params if p.grad is not None]
    sq = float(torch.stack([g.float().pow(2).sum() for g in grads]).sum()) if grads else 0.0
    if sum_over_stages is not None:
        sq = sum_over_stages(sq)
    return math.sqrt(sq)


def clip_gradients(params: Iterable[torch.nn.Parameter], norm: float, max_norm: float) -> None:
    """Scale gradients so their global norm is at most max_norm (norm computed beforehand)."""
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        factor = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(factor)
