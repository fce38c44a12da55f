"""hvdllm.layout: one table of worlds and batch settings, what each gives or why it is refused."""

from __future__ import annotations

import pytest

from hvdllm.layout import Layout, LayoutError, plan

# (world, stages, global, micro_batch_size, micro_batches) -> (replicas, m, mbs)
FITS = [
    ((1, 1, 8, 4, 0), (1, 2, 4)),          # one process: accumulation 2
    ((2, 1, 8, 4, 0), (2, 1, 4)),          # data parallel
    ((4, 1, 16, 2, 0), (4, 2, 2)),
    ((2, 2, 16, 0, 4), (1, 4, 4)),         # jobs/pipeline.toml on 2 ranks
    ((4, 2, 16, 0, 4), (2, 4, 2)),         # ... on 4 ranks
    ((8, 2, 16, 0, 4), (4, 4, 1)),         # ... on 8 ranks (hvdllm slurm once refused this)
    ((4, 2, 16, 2, 4), (2, 4, 2)),         # both set and consistent
    ((8, 4, 64, 1, 0), (2, 32, 1)),
]

REFUSED = [
    ((3, 2, 16, 0, 4), "not a multiple of parallel.pipeline_stages"),
    ((3, 1, 8, 4, 0), "not divisible by the 3 replicas"),
    ((4, 1, 8, 4, 0), "not divisible by micro_batch_size x replicas (4 x 4)"),
    ((2, 2, 16, 8, 4), "not a multiple of training.micro_batch_size (8) x parallel.micro_batches (4)"),
    ((4, 2, 16, 4, 4), "x 2 replica(s) = 32, not training.global_batch_size (16)"),
    ((8, 2, 16, 0, 8), "not divisible by parallel.micro_batches x replicas (8 x 4)"),
    ((1, 1, 8, 0, 0), "both are 0"),
    ((1, 1, 8, 3, 0), "not a multiple of training.micro_batch_size (3)"),
    ((0, 1, 8, 4, 0), "must be >= 1"),
]


@pytest.mark.parametrize("args,want", FITS)
def test_layouts_that_fit(args, want):
    layout = plan(*args)
    assert (layout.replicas, layout.micro_batches, layout.micro_batch_size) == want
    assert layout.global_batch_size == args[2]  # the invariant every layout keeps


@pytest.mark.parametrize("args,message", REFUSED)
def test_layouts_that_are_refused_say_why(args, message):
    with pytest.raises(LayoutError) as e:
        plan(*args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_rank_grid():
    g = Layout(world=8, stages=4, replicas=2, micro_batches=1, micro_batch_size=1)
    assert [g.position(r) for r in (0, 3, 4, 7)] == [(0, 0), (3, 0), (0, 1), (3, 1)]
    assert g.stage_ranks(1) == [1, 5] and g.replica_ranks(1) == [4, 5, 6, 7]
    assert "replica 1: ranks   4   5   6   7" in g.describe()
