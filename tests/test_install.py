"""The install works: Horovod built with PyTorch, MPI and Gloo, and a real 2-rank all-reduce."""

from __future__ import annotations

from conftest import BIN, SCRIPTS, mpirun, run


def test_horovod_check_build_lists_pytorch_mpi_gloo():
    out = run([BIN / "horovodrun", "--check-build"]).stdout
    for part in ("PyTorch", "MPI", "Gloo"):
        assert f"[X] {part}" in out, out


def test_two_rank_allreduce_under_mpirun():
    p = mpirun(2, [BIN / "python", SCRIPTS / "allreduce.py"], timeout=120)
    lines = sorted(line for line in p.stdout.splitlines() if line.startswith("rank"))
    # rank r contributes [r + 1, 10 (r + 1)]: the sum is [3, 30] on both ranks.
    assert lines == ["rank 0 of 2: [3.0, 30.0]", "rank 1 of 2: [3.0, 30.0]"], p.stdout
