"""Pipeline schedules and partitioning, checked without MPI (the real runs are in test_pipeline)."""

from __future__ import annotations

import pytest
import torch

from hvdllm.config import ModelConfig
from hvdllm.models import build_model, partition_for
from hvdllm.models.stage import balanced_partition
from hvdllm.parallel.schedules import bubble_fraction, gpipe, one_f_one_b, simulate


def test_schedule_orders():
    assert gpipe(2, 0, 3) == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("B", 1), ("B", 2)]
    assert one_f_one_b(2, 0, 4) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3),
                                    ("B", 2), ("B", 3)]
    assert one_f_one_b(2, 1, 4) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2),
                                    ("F", 3), ("B", 3)]
    assert one_f_one_b(1, 0, 3) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
def test_no_deadlock_and_live_activations(stages, m):
    for name in ("gpipe", "1f1b"):
        for s in range(stages):
            plan = {"gpipe": gpipe, "1f1b": one_f_one_b}[name](stages, s, m)
            assert sorted(plan) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
    assert simulate("gpipe", stages, m) == [m] * stages
    peak = simulate("1f1b", stages, m)
    assert max(peak) <= stages and peak == [min(stages - s, m) for s in range(stages)]


def test_simulate_detects_a_deadlock(monkeypatch):
    from hvdllm.parallel import schedules

    # A broken schedule: the last stage wants micro-batch 1 before 0 has gone through.
    monkeypatch.setitem(schedules.SCHEDULES, "broken",
                        lambda P, s, m: [("B", 0), ("F", 0)] if s == P - 1 else gpipe(P, s, m))
    with pytest.raises(RuntimeError, match="deadlocks"):
        simulate("broken", 2, 2)


def test_bubble_theory():
    assert bubble_fraction(2, 8) == pytest.approx(1 / 9)
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(1, 8) == 0


def test_balanced_partition():
    assert balanced_partition(8, 2, 1.0, 0.0, 0.0) == [4, 4]
    assert balanced_partition(8, 2, 1.0, 0.0, 2.0) == [5, 3]  # the head costs two blocks
    assert balanced_partition(4, 4, 1.0, 0.0, 5.0) == [1, 1, 1, 1]
    assert sum(balanced_partition(13, 3, 1.0, 0.5, 1.5)) == 13
    with pytest.raises(ValueError, match="every stage needs one"):
        balanced_partition(2, 3, 1.0, 0.0, 0.0)


def model(family: str, n_layer: int = 4):
    cfg = ModelConfig(family=family, n_layer=n_layer, n_embd=32, n_head=4)
    return build_model(cfg, vocab_size=300, seq_len=16, seed=3)


def test_partition_for_explicit_and_automatic():
    assert partition_for(model("gpt2"), 2, [1, 3]) == [range(0, 1), range(1, 4)]
    ranges = partition_for(model("llama"), 3)
    assert [r.start for r in ranges] == [0] + [r.stop for r in ranges[:-1]] and ranges[-1].stop == 4
