"""Run under `mpirun -np R` (MPI) or `horovodrun --gloo -np R` (Gloo): bfloat16 collectives.

Usage: bf16_collectives.py OUT. Every rank builds every rank's inputs from fixed seeds, runs
Horovod's collectives on its own bfloat16 tensors and compares each result with a float64
reference computed from the same bfloat16 inputs. Each rank writes its findings as JSON to
OUT.rank{R}: its own file, because several ranks' lines on one stdout can interleave.

Tolerance of a sum over R ranks: any reduction order (ring, tree, halving-doubling) performs
R - 1 additions per element, each computed in float32 and rounded once to bfloat16, whose unit
roundoff is u = 2**-8; every partial sum is at most S = sum_q |x_q|, so
    |result - exact| <= (R - 1) * u * S              (Sum)
and an Average adds one rounding of the scaled result:
    |result - exact / R| <= ((R - 1) * u * S + u * |exact|) / R.
Both bounds get 1 % slack for second-order terms. Min, max, allgather, broadcast and alltoall
move or select values and must be bit-exact.
"""
import json
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

U = 2.0 ** -8
N = 10_007  # odd: the vectorised and the remainder paths of every loop


def inputs(rank: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Rank `rank`'s tensor: normal values times 10**k, k uniform in [-30, 30] (fp16 would
    overflow or flush most of them)."""
    g = torch.Generator().manual_seed(1000 + rank + 7 * len(shape))
    scale = 10.0 ** (torch.rand(shape, generator=g) * 60 - 30)
    return (torch.randn(shape, generator=g) * scale).to(torch.bfloat16)


def worst_ratio(result: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> float:
    """max |result - exact| / bound (<= 1 passes); inf when the result is not bfloat16."""
    if result.dtype != torch.bfloat16:
        return float("inf")
    err = (result.double() - exact).abs()
    return float((err / (bound * 1.01).clamp_min(1e-300)).max())


def sums(size: int, rank: int) -> dict[str, float]:
    xs = [inputs(q, (N,)) for q in range(size)]
    exact = sum(x.double() for x in xs)
    s = sum(x.double().abs() for x in xs)
    bound_sum = (size - 1) * U * s
    bound_avg = (bound_sum + U * exact.abs()) / size
    mine = xs[rank]
    out = {"allreduce_sum": worst_ratio(hvd.allreduce(mine, op=hvd.Sum), exact, bound_sum),
           "allreduce_average": worst_ratio(hvd.allreduce(mine, op=hvd.Average),
                                            exact / size, bound_avg)}
    grouped = hvd.grouped_allreduce([mine, mine[:100].clone()], op=hvd.Sum)
    out["grouped_allreduce_sum"] = max(worst_ratio(grouped[0], exact, bound_sum),
                                       worst_ratio(grouped[1], exact[:100], bound_sum[:100]))
    rows = size * 5 + 1  # not a multiple of size: the first rank gets one row more
    ms = [inputs(q, (rows, 3)) for q in range(size)]
    m_exact, m_abs = sum(m.double() for m in ms), sum(m.double().abs() for m in ms)
    start = rank * 5 + min(rank, 1)
    part = slice(start, start + 5 + (rank < 1))
    rs = hvd.reducescatter(ms[rank], op=hvd.Sum)
    out["reducescatter_sum"] = worst_ratio(rs, m_exact[part], (size - 1) * U * m_abs[part])
    rs_avg = hvd.reducescatter(ms[rank], op=hvd.Average)
    bound = ((size - 1) * U * m_abs[part] + U * m_exact[part].abs()) / size
    out["reducescatter_average"] = worst_ratio(rs_avg, m_exact[part] / size, bound)
    return out


def exact_ops(size: int, rank: int) -> dict[str, bool]:
    xs = [inputs(q, (N,)) for q in range(size)]
    mine = xs[rank]
    stacked = torch.stack(xs)
    gathered = [inputs(q, (q + 2, 4)) for q in range(size)]  # a different row count per rank
    chunks = [inputs(q, (size * 3,)) for q in range(size)]
    return {
        "allreduce_min": torch.equal(hvd.allreduce(mine, op=hvd.Min), stacked.min(0).values),
        "allreduce_max": torch.equal(hvd.allreduce(mine, op=hvd.Max), stacked.max(0).values),
        "allgather": torch.equal(hvd.allgather(gathered[rank]), torch.cat(gathered)),
        "broadcast": torch.equal(hvd.broadcast(mine, root_rank=0), xs[0]),
        "alltoall": torch.equal(hvd.alltoall(chunks[rank]),
                                torch.cat([c[rank * 3:(rank + 1) * 3] for c in chunks])),
    }


def main() -> None:
    out = sys.argv[1]
    hvd.init()
    size, rank = hvd.size(), hvd.rank()
    result = {"rank": rank, "size": size, "ratios": sums(size, rank),
              "exact": exact_ops(size, rank)}
    Path(f"{out}.rank{rank}").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
