"""Shared helpers: real launchers (mpirun, horovodrun), a prepared tiny corpus, job files;
test groups (markers) by module, and a wall-clock bound for tests that start ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hvdllm.launch.env import mpi_env

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "jobs" / "tiny.toml"
BIN = Path(sys.executable).parent
SCRIPTS = Path(__file__).parent / "scripts"

GROUPS = ("unit", "mpi", "slurm", "bench", "multihost", "elastic", "data")
"""Test groups, registered as markers in setup.cfg; every test belongs to exactly one."""

GROUP_OF_MODULE = {
    "test_config": "unit", "test_layout": "unit", "test_schedules": "unit", "test_optim": "unit",
    "test_docs": "unit", "test_data": "unit", "test_models": "unit", "test_slurm_templates": "unit",
    "test_metrics": "unit", "test_plan": "unit", "test_device_messages": "unit",
    "test_data_parallel": "mpi", "test_pipeline": "mpi", "test_install": "mpi",
    "test_slurm": "slurm", "test_slurm_prepare": "slurm", "test_bench": "bench",
    "test_data_sources": "data", "test_data_scale": "data", "test_multihost": "multihost",
    "test_slurm_nodes": "multihost", "test_elastic": "elastic",
}
"""The group of a test that carries no group marker itself; a module not listed here is `mpi`
(the slow side, so that a new module never slips into `pytest -m unit` unnoticed)."""

GROUP_BUDGET_S = {"unit": 120, "mpi": 540, "slurm": 300, "bench": 420, "multihost": 360,
                  "elastic": 180, "data": 120}
"""What each group may take in all on 2 shared cores (`make test` ~30 min with the set-up); the
end of a session prints each group's time against it (a report, never a failure: times here
are noisy)."""

TEST_TIMEOUT_S = {"mpi": 900, "bench": 900, "slurm": 1800, "multihost": 600, "elastic": 600}
"""Wall-clock bound of one test's body (fixtures excluded) by group; each launch has its own."""


def env() -> dict[str, str]:
    """The launch environment: local OpenMPI settings (hvdllm.launch.env), unbuffered Python,
    this venv's bin first on PATH, and no GPU: the tests' ranks run on the CPU even on a GPU
    machine (two test ranks on one GPU is refused; GPU checks: scripts/gpu-check.sh)."""
    e = mpi_env(PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    e["PATH"] = f"{BIN}:{e['PATH']}"
    return e


def run(cmd: list[str], timeout: float = 300, check: bool = True, cwd: Path | None = None
        ) -> subprocess.CompletedProcess:
    """Run a command; on an unexpected exit show its output in the assertion. Past `timeout`
    the command and everything it started (ranks, launchers) are killed: none outlives its test."""
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(), cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}\n"
                             f"--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}")
    return p


def mpirun(np: int, args: list, **kw) -> subprocess.CompletedProcess:
    """`mpirun -np NP ARGS` through run() (so with its timeout)."""
    return run(["mpirun", "-np", np, *args], **kw)


def hvdllm(*args) -> list[str]:
    return [BIN / "hvdllm", *args]


def read_jsonl(path: Path) -> list[dict]:
    """The complete records of a .jsonl file. Each record ends with a newline; a test that polls
    a running job can read the file mid-write, so text after the last newline (a record still
    being written) is left out."""
    complete = path.read_text().split("\n")[:-1]
    return [json.loads(line) for line in complete if line]


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


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


def group_of(item: pytest.Item) -> str:
    """The test's group: its own group marker if it has one, else its module's."""
    own = [m.name for m in item.iter_markers() if m.name in GROUPS]
    return own[0] if own else GROUP_OF_MODULE.get(item.path.stem, "mpi")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its group, so that `pytest -m unit` (or mpi, slurm, bench) selects it."""
    for item in items:
        group = group_of(item)
        if not item.get_closest_marker(group):
            item.add_marker(getattr(pytest.mark, group))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Fail a test of a slow group whose body runs past its bound (SIGALRM; the launch helpers'
    subprocess.run kills the launch in flight when the failure interrupts it)."""
    limit = TEST_TIMEOUT_S.get(group_of(item))
    if not limit or not hasattr(signal, "setitimer"):
        return (yield)

    def expire(signum, frame):
        pytest.fail(f"{item.nodeid} ran past its {limit} s bound ({group_of(item)} test)", pytrace=False)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        return (yield)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_GROUP_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Add each phase's duration (set-up, call, tear-down) to its test's group."""
    group = next((k for k in report.keywords if k in GROUPS), "mpi")
    _GROUP_SECONDS[group] = _GROUP_SECONDS.get(group, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Each group's time against its budget (GROUP_BUDGET_S)."""
    if not _GROUP_SECONDS:
        return
    terminalreporter.section("time per test group (s, against its budget)")
    for group in GROUPS:
        if group in _GROUP_SECONDS:
            spent, budget = _GROUP_SECONDS[group], GROUP_BUDGET_S[group]
            flag = "  OVER BUDGET" if spent > budget else ""
            terminalreporter.write_line(f"{group:>10} {spent:7.0f} / {budget:4d}{flag}")
