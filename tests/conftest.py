"""Shared helpers: real launchers (mpirun, horovodrun), a prepared tiny corpus, job files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "jobs" / "tiny.toml"
BIN = Path(sys.executable).parent
SCRIPTS = Path(__file__).parent / "scripts"

# OpenMPI as root, more ranks than cores, and yielding instead of spinning (see docs/launching.md).
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_mpi_yield_when_idle": "1",
           "OMPI_MCA_hwloc_base_binding_policy": "none", "PYTHONUNBUFFERED": "1"}


def env() -> dict[str, str]:
    e = dict(os.environ, **MPI_ENV)
    e["PATH"] = f"{BIN}:{e['PATH']}"
    return e


def run(cmd: list[str], timeout: float = 300, check: bool = True, cwd: Path | None = None
        ) -> subprocess.CompletedProcess:
    """Run a command; on an unexpected exit show its output in the assertion."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                       env=env(), cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}\n"
                             f"--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}")
    return p


def mpirun(np: int, args: list, **kw) -> subprocess.CompletedProcess:
    return run(["mpirun", "-np", np, *args], **kw)


def hvdllm(*args) -> list[str]:
    return [BIN / "hvdllm", *args]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The tiny job's corpus, prepared once for the whole session."""
    data = tmp_path_factory.mktemp("tiny-data") / "data"
    run(hvdllm("prepare", TINY, "--set", f"data.dir={data}"))
    return data


@pytest.fixture
def tiny_args(tiny_data, tmp_path):
    """--set arguments that point the tiny job at the shared data and a fresh run dir."""
    def make(name: str = "run", *extra: str) -> list[str]:
        args = ["--set", f"data.dir={tiny_data}", "--set", f"run.dir={tmp_path / name}"]
        for e in extra:
            args += ["--set", e]
        return args
    return make
