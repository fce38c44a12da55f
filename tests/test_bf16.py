"""bfloat16 collectives (patches/horovod/0003-bfloat16.patch) with real ranks on MPI and Gloo,
and the bf16 gradient compressor. Tolerances are derived in tests/scripts/bf16_collectives.py:
(R - 1) bf16 roundings of partial sums per element for a sum over R ranks; moves are bit-exact."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BIN, SCRIPTS, run

from hvdllm.parallel.compression import (
    BF16Compressor, compressor, needs_overflow_check, predivide_factor, wire_bytes)


def collectives(tmp_path, launch: list, size: int) -> list[dict]:
    out = tmp_path / "bf16"
    run([*launch, BIN / "python", SCRIPTS / "bf16_collectives.py", out], timeout=180)
    return [json.loads((tmp_path / f"bf16.rank{r}").read_text()) for r in range(size)]


def assert_within_bf16_rounding(results: list[dict], size: int) -> None:
    for r in results:
        assert r["size"] == size
        bad = {k: v for k, v in r["ratios"].items() if not v <= 1.0}
        assert not bad, f"rank {r['rank']}: error over the bound (ratio) {bad}"
        assert all(r["exact"].values()), f"rank {r['rank']}: not bit-exact {r['exact']}"


@pytest.mark.parametrize("size", [2, 3])
def test_bf16_collectives_over_mpi(tmp_path, size):
    results = collectives(tmp_path, ["mpirun", "--oversubscribe", "-np", size], size)
    assert_within_bf16_rounding(results, size)
    # The sums really round in bf16 (not silently widened): some error is above zero.
    assert max(r["ratios"]["allreduce_sum"] for r in results) > 0


def test_bf16_collectives_over_gloo(tmp_path):
    results = collectives(tmp_path, [BIN / "horovodrun", "--gloo", "-np", 2, "-H", "localhost:2"], 2)
    assert_within_bf16_rounding(results, 2)


@pytest.mark.unit
def test_bf16_compressor_round_trips_dtypes():
    g = torch.randn(1000, dtype=torch.float32) * 1e30  # fp16 would overflow to inf
    wire, ctx = BF16Compressor.compress(g)
    assert wire.dtype == torch.bfloat16 and torch.isfinite(wire).all()
    back = BF16Compressor.decompress(wire, ctx)
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, g, rtol=2 ** -8, atol=0)  # one rounding to nearest
    ints = torch.arange(4)
    assert BF16Compressor.decompress(*BF16Compressor.compress(ints)) is ints
    assert compressor("bf16") is BF16Compressor and wire_bytes("bf16") == wire_bytes("fp16") == 2
    assert predivide_factor("bf16", 4) == 1.0 and predivide_factor("fp16", 4) == 4.0
    assert not needs_overflow_check("bf16") and needs_overflow_check("fp16")
