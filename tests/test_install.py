"""The install works: Horovod built with PyTorch, MPI and Gloo, a real 2-rank all-reduce, and the
launch environment the Makefile and the tests share."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, ROOT, SCRIPTS, env, mpirun, run

from hvdllm.launch.env import LOCAL_MPI_ENV


def test_horovod_check_build_lists_pytorch_mpi_gloo():
    out = run([BIN / "horovodrun", "--check-build"]).stdout
    for part in ("PyTorch", "MPI", "Gloo"):
        assert f"[X] {part}" in out, out


def test_two_rank_allreduce_under_mpirun(tmp_path):
    out = tmp_path / "allreduce"
    mpirun(2, [BIN / "python", SCRIPTS / "allreduce.py", out], timeout=120)
    # rank r contributes [r + 1, 10 (r + 1)]: the sum is [3, 30] on both ranks.
    for rank in range(2):
        got = json.loads(Path(f"{out}.rank{rank}").read_text())
        assert got == {"rank": rank, "size": 2, "sum": [3.0, 30.0]}


@pytest.mark.unit
def test_launch_environment_is_printed_for_make_and_used_by_the_tests():
    """`python -m hvdllm.launch.env` (the Makefile's `env $(...) mpirun`) prints every setting as
    NAME=value, and the tests' launch environment carries the same settings."""
    p = subprocess.run([BIN / "python", "-m", "hvdllm.launch.env"], capture_output=True, text=True,
                       cwd=ROOT, timeout=30, check=True)
    printed = dict(line.split("=", 1) for line in p.stdout.splitlines())
    assert printed == LOCAL_MPI_ENV
    # Standard library only: it also runs without site-packages (python -S).
    bare = subprocess.run([BIN / "python", "-S", ROOT / "hvdllm" / "launch" / "env.py"],
                          capture_output=True, text=True, timeout=30, check=True)
    assert bare.stdout == p.stdout
    assert {"OMPI_ALLOW_RUN_AS_ROOT", "OMPI_MCA_rmaps_base_oversubscribe",
            "OMPI_MCA_hwloc_base_binding_policy", "OMPI_MCA_mpi_yield_when_idle"} <= printed.keys()
    assert LOCAL_MPI_ENV.items() <= env().items()
    assert "$(PY) -m hvdllm.launch.env" in (ROOT / "Makefile").read_text()
