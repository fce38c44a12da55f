"""Optimizers, schedules (gradnorm against a hand computation), clipping and the loss scaler."""

from __future__ import annotations

import math

import pytest
import torch

from hvdllm.config import OptimConfig
from hvdllm.optim import LRSchedule, build_optimizer, clip_gradients, global_grad_norm, scaled_peak_lr
from hvdllm.precision import LossScaler


def test_gradnorm_rate_matches_hand_computation():
    cfg = OptimConfig(schedule="gradnorm", gradnorm_alpha=0.5, gradnorm_beta=2.0, gradnorm_eps=0.1)
    sched = LRSchedule(cfg, peak_lr=0.01, total_steps=100)
    # |g| = 3: 1 + 2 * 9 / 3.1 = 6.806451...; its -0.5 power = 0.3833007...
    assert sched(10, 3.0) == pytest.approx(0.01 * 0.38330071, rel=1e-6)
    assert sched(10, 0.0) == pytest.approx(0.01)
    assert sched(10, 30.0) < sched(10, 3.0) < sched(10, 0.3)  # larger gradients, smaller steps
    cfg.warmup_steps = 4
    assert LRSchedule(cfg, 0.01, 100)(1, 3.0) == pytest.approx(0.5 * 0.01 * 0.38330071, rel=1e-6)


def test_warmup_then_cosine_and_linear():
    cfg = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    s = LRSchedule(cfg, 1.0, 110)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert s(110) == pytest.approx(0.1)
    cfg.schedule = "linear"
    assert LRSchedule(cfg, 1.0, 110)(60) == pytest.approx(0.55)
    cfg.schedule = "constant"
    assert LRSchedule(cfg, 1.0, 110)(100) == 1.0


def test_lr_scaling_with_replicas():
    assert scaled_peak_lr(OptimConfig(lr=0.1, lr_scaling="linear"), 4) == pytest.approx(0.4)
    assert scaled_peak_lr(OptimConfig(lr=0.1, lr_scaling="sqrt"), 4) == pytest.approx(0.2)
    assert scaled_peak_lr(OptimConfig(lr=0.1), 4) == pytest.approx(0.1)


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
                                       ("adagrad", torch.optim.Adagrad), ("sgd", torch.optim.SGD)])
def test_optimizers_and_no_decay_groups(name, cls):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimConfig(name=name, nesterov=True, weight_decay=0.1), 0.01)
    assert isinstance(opt, cls)
    decay, no_decay = opt.param_groups
    assert [p.dim() for p in decay["params"]] == [2] and no_decay["weight_decay"] == 0.0
    if name == "sgd":
        assert decay["nesterov"] and decay["momentum"] == 0.9


def test_clip_by_global_norm():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    params[0].grad, params[1].grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    norm = global_grad_norm(params)
    assert norm == pytest.approx(5.0)
    clip_gradients(params, norm, 1.0)
    assert global_grad_norm(params) == pytest.approx(1.0, rel=1e-5)
    assert global_grad_norm(params, sum_over_stages=lambda sq: 4 * sq) == pytest.approx(2.0, rel=1e-5)


def test_loss_scaler_skips_on_overflow_and_grows():
    p = torch.nn.Parameter(torch.zeros(2))
    scaler = LossScaler(True, initial_scale=8.0, growth_interval=2)
    p.grad = torch.tensor([8.0, 16.0])
    assert scaler.unscale_and_check([p]) is False and p.grad.tolist() == [1.0, 2.0]
    scaler.update(False)
    p.grad = torch.tensor([float("inf"), 1.0])
    assert scaler.unscale_and_check([p]) is True
    scaler.update(True)
    assert scaler.scale == 4.0
    scaler.update(False), scaler.update(False)
    assert scaler.scale == 8.0
    # The decision is the world's: a rank with clean gradients still skips when another overflowed.
    p.grad = torch.tensor([1.0, 1.0])
    assert LossScaler(True, 2.0, world_max=lambda flag: 1.0).unscale_and_check([p]) is True
    off = LossScaler(False)
    assert off.scale_loss(torch.tensor(3.0)) == 3.0 and off.unscale_and_check([p]) is False


def test_overflow_check_without_loss_scaling():
    """fp16 gradient compression with fp32/bf16 training: skip non-finite steps at scale 1."""
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([2.0, float("nan")])
    scaler = LossScaler(False, check_overflow=True)
    assert scaler.unscale_and_check([p]) is True and scaler.scale == 1.0
    p.grad = torch.tensor([2.0, 3.0])
    assert scaler.unscale_and_check([p]) is False and p.grad.tolist() == [2.0, 3.0]
    scaler.update(True)
    assert scaler.scale == 1.0 and scaler.scale_loss(torch.tensor(3.0)) == 3.0
