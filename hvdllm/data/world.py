"""The ranks of `mpirun -np N hvdllm prepare JOB` (mpi4py directly; no Horovod).

Every step that can fail on one rank runs under `agree`: the ranks exchange their outcome, and
all of them raise the first failure, so none is left waiting in a collective.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from hvdllm.errors import UserError

T = TypeVar("T")

LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
"""Set by mpirun / srun --mpi for every rank; `prepare` starts MPI only when one says > 1."""


@dataclass
class World:
    rank: int = 0
    size: int = 1
    comm: Any = None
    """mpi4py's COMM_WORLD, or None for one process."""

    def bcast(self, obj: T) -> T:
        return self.comm.bcast(obj, root=0) if self.comm else obj

    def gather(self, obj: T) -> list[T]:
        """Every rank's obj on rank 0 (in rank order); [] on the others."""
        if not self.comm:
            return [obj]
        return self.comm.gather(obj, root=0) or []

    def barrier(self) -> None:
        if self.comm:
            self.comm.Barrier()

    def agree(self, fn: Callable[[], T]) -> T:
        """Run fn on this rank; if it fails on any rank, raise that failure on every rank."""
        try:
            value, error = fn(), None
        except UserError as e:
            value, error = None, ("user", str(e))
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            if not self.comm:
                raise
            traceback.print_exc()
            value, error = None, ("bug", f"rank {self.rank}: {type(e).__name__}: {e}")
        errors = self.comm.allgather(error) if self.comm else [error]
        first = next((e for e in errors if e), None)
        if first:
            raise UserError(first[1]) if first[0] == "user" else RuntimeError(first[1])
        return value


def launcher_size(env: Mapping[str, str]) -> int:
    """Ranks the launcher started, from its environment. Slurm's PMIx plugin sets each task's
    PMIX_RANK but no size: the step's task count says it then."""
    sizes = [int(env.get(v) or 1) for v in LAUNCHER_SIZE_VARS]
    if "PMIX_RANK" in env or "PMI_RANK" in env:
        sizes.append(int(env.get("SLURM_STEP_NUM_TASKS") or 1))
    return max(sizes)


def launched_world() -> World:
    """The launcher's world: mpi4py's COMM_WORLD when started by mpirun/srun with N > 1 ranks,
    else one process (MPI is not initialised)."""
    if launcher_size(os.environ) <= 1:
        return World()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return World(comm.Get_rank(), comm.Get_size(), comm if comm.Get_size() > 1 else None)
