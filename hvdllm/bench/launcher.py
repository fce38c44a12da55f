"""Starting the bench's ranks: `mpirun` with the local MPI environment and a time limit."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from hvdllm.launch.env import free_port, mpi_env

LAUNCH_TIMEOUT_S = 1800
"""A launch that runs longer than this is reported as hung (it would otherwise block the bench)."""


def hvdllm_command(*args: str) -> list[str]:
    """`hvdllm ARGS...` from the same environment as this process."""
    return [str(Path(sys.executable).parent / "hvdllm"), *args]


def module_command(module: str, *args: str) -> list[str]:
    """`python -m MODULE ARGS...` with this process's interpreter."""
    return [sys.executable, "-m", module, *args]


def set_args(settings: list[str]) -> list[str]:
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]."""
    return [arg for s in settings for arg in ("--set", s)]


def run_ranks(ranks: int, cmd: list[str], what: str,
              timeout_s: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`mpirun -np RANKS CMD` on this machine; a failure or a hang raises RuntimeError naming `what`.

    Each launch gets a fresh MASTER_PORT for the DDP peer's rendezvous (a reused one hung the
    next launch); the Horovod launches ignore it.
    """
    return run_launch(["mpirun", "-np", str(ranks), *cmd], mpi_env(MASTER_PORT=str(free_port())),
                      what, timeout_s)


def run_launch(full: list[str], env: dict[str, str], what: str,
               timeout_s: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run one launch command (mpirun and its arguments, or that wrapped to start elsewhere)."""
    proc = subprocess.Popen(full, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # mpirun and every rank it started here
        proc.communicate()
        raise RuntimeError(f"bench launch hung for {timeout_s:.0f} s ({what}): "
                           f"{shlex.join(full)}") from None
    p = subprocess.CompletedProcess(full, proc.returncode, out, err)
    if p.returncode != 0:
        raise RuntimeError(f"bench launch failed ({what}): {shlex.join(full)}\n{p.stderr[-3000:]}")
    return p
