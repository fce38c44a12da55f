"""Memory per rank (hvdllm/train/memory.py): exact counts against a real optimizer step, the
activation estimate against the saved-tensor counter, the slurm warning (unit tests); predicted
against measured peaks with real ranks (the mpi test)."""

from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import BIN, TINY, env
from hvdllm.config import ModelConfig, OptimConfig, load_job
from hvdllm.models import Stage, empty_model, fill_weights, model_config
from hvdllm.models.activations import checkpointed_blocks
from hvdllm.optim import build_optimizer
from hvdllm.precision import autocast
from hvdllm.train import memory

CPU = torch.device("cpu")
pytestmark = pytest.mark.unit


def small_stage(family: str, layers: range, first: bool, last: bool, n_layer: int = 3) -> Stage:
    cfg = ModelConfig(family=family, n_layer=n_layer, n_embd=96, n_head=4,
                      n_kv_head=2 if family == "llama" else 0, intermediate_size=160 if family == "llama" else 0)
    model = empty_model(model_config(cfg, 100, 40))
    stage = Stage(model, layers, first, last)
    fill_weights(stage.model, cfg, 0)
    return stage


@pytest.mark.parametrize("name,momentum", [("adamw", 0.0), ("adam", 0.0), ("adagrad", 0.0),
                                           ("sgd", 0.9), ("sgd", 0.0)])
def test_optimizer_bytes_equal_the_state_after_a_step(name, momentum):
    stage = small_stage("llama", range(0, 3), True, True)
    cfg = OptimConfig(name=name, momentum=momentum)
    opt = build_optimizer(stage.model, cfg, 1e-3)
    params = [p for p in stage.model.parameters() if p.requires_grad]
    stage.forward(torch.randint(0, 100, (2, 40))).float().mean().backward()
    opt.step()
    assert memory.counted_optimizer_bytes(opt) == memory.optimizer_state_bytes(params, cfg)
    assert memory.zero_optimizer_bytes(params, cfg, 4) <= \
        memory.optimizer_state_bytes(params, cfg) // 4 + 12 * len(params)  # padding, steps


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("part", ["whole", "first", "middle", "last", "checkpointed"])
def test_activation_estimate_equals_the_counter(family, dtype, part):
    layers, first, last = {"whole": (range(0, 3), True, True), "first": (range(0, 1), True, False),
                           "middle": (range(1, 2), False, False), "last": (range(2, 3), False, True),
                           "checkpointed": (range(0, 3), True, True)}[part]
    stage = small_stage(family, layers, first, last)
    if part == "checkpointed":
        stage.checkpointed = checkpointed_blocks("blocks", 2, 3)
    measured = memory.measure_activations(stage, CPU, lambda: autocast(dtype, CPU), 3, 40, 100)
    estimated, _ = memory.stage_activation_estimate(stage, 3 * 40, 40, dtype != "fp32",
                                                    stage.checkpointed)
    assert abs(estimated - measured) <= 16, (estimated, measured)  # the loss scalar at most


def test_in_flight_follows_the_schedules():
    assert [memory.in_flight("1f1b", 4, s, 8) for s in range(4)] == [4, 3, 2, 1]
    assert memory.in_flight("1f1b", 4, 0, 2) == 2
    assert memory.in_flight("gpipe", 4, 3, 8) == 8


def test_predict_counts_parameters_exactly_and_zero_divides_optimizer():
    job = load_job(TINY, [])
    rows = memory.predict(job, 1, "cpu")
    full = empty_model(model_config(job.model, memory.job_vocab_size(job), job.data.seq_len))
    assert rows[0].parameters == sum(p.numel() * 4 for p in full.parameters())
    assert rows[0].predicted_peak == (rows[0].fixed + 2 * rows[0].parameters + rows[0].optimizer
                                      + rows[0].activations + rows[0].transient)


def test_memory_command_and_slurm_warning(tmp_path):
    out = subprocess.run([BIN / "hvdllm", "memory", TINY, "--world", "2"], capture_output=True,
                         text=True, env=env(), check=True)
    assert "largest per-rank peak" in out.stdout
    p = subprocess.run([BIN / "hvdllm", "slurm", TINY, "--set", "slurm.gpu_memory_gb=0.01",
                        "--set", f"run.dir={tmp_path}"], capture_output=True, text=True, env=env())
    assert p.returncode == 0, p.stderr
    warnings = [line for line in p.stderr.splitlines() if "does not fit" in line]
    assert len(warnings) == 1 and "slurm.gpu_memory_gb" in warnings[0]
    q = subprocess.run([BIN / "hvdllm", "slurm", TINY, "--set", f"run.dir={tmp_path}"],
                       capture_output=True, text=True, env=env())
    assert q.returncode == 0 and "does not fit" not in q.stderr


def test_zero1_optimizer_bytes_are_a_slice():
    """AdamW with ZeRO-1 over 2 replicas: half of each parameter's moments (replica 0 holds the
    larger half of an odd size) and one step scalar per part."""
    import torch

    from hvdllm.config import OptimConfig
    from hvdllm.train.memory import optimizer_state_bytes, zero_optimizer_bytes

    params = [torch.empty(10), torch.empty(7), torch.empty(4)]  # replica 0: 5 + 4 + 2 elements
    adamw = OptimConfig(name="adamw")
    assert zero_optimizer_bytes(params, adamw, 1) == optimizer_state_bytes(params, adamw)
    assert zero_optimizer_bytes(params, adamw, 2) == 2 * 4 * 11 + 4 * 3
    assert zero_optimizer_bytes(params, OptimConfig(name="sgd", momentum=0.0), 2) == 0


def test_zero1_buffers_and_all_gather_chunks(monkeypatch):
    """ZeRO-1's buffers: replica 0's gradient parts plus one chunk of all-gather outputs; the
    all-gather runs over consecutive chunks of at most GATHER_CHUNK_BYTES (a larger one alone)."""
    import torch

    from hvdllm.parallel import zero
    from hvdllm.train.memory import zero_exchange_bytes

    sizes = [10, 7, 4, 30]  # parts over 2 replicas: 5, 4, 2, 15; gathered 40, 32, 16, 120 bytes
    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    assert zero_exchange_bytes(params[:3], 2) == 4 * 11 + 88  # every output fits one chunk
    monkeypatch.setattr(zero, "GATHER_CHUNK_BYTES", 100)
    assert zero_exchange_bytes(params, 2) == 4 * 26 + 120  # the largest parameter, alone
    sync = zero.ZeroSync([(f"p{i}", p) for i, p in enumerate(params)],
                         lambda decay, no_decay: torch.optim.SGD(decay + no_decay, lr=0.1),
                         "none", None, replicas=2, replica=1, stage=0, backward_passes=1,
                         sum_over_replicas=float)
    assert [[s.name for s in c] for c in sync._gather_chunks()] == [["p0", "p1", "p2"], ["p3"]]
    assert [(s.start, s.length) for s in sync.segments] == [(5, 5), (4, 3), (2, 2), (15, 15)]
