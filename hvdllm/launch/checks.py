"""Launches that cannot work, recognised before MPI starts: one clear line instead of a hang, N
independent copies of the run, or a page of MPI errors.

Called by parallel/topology.py with the facts (environment, what Horovod was built with), so it
needs neither MPI nor Horovod itself and the tests can state any combination.
"""

from __future__ import annotations

from collections.abc import Mapping

from hvdllm.errors import UserError

MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")
"""Set for each rank by an MPI launcher: mpirun (OpenMPI), srun --mpi=pmix, srun --mpi=pmi2."""


def launch_problem(env: Mapping[str, str], mpi_built: bool, gloo_built: bool) -> str:
    """Why a rank started with this environment cannot join a working world ("" if it can)."""
    if env.get("HOROVOD_CONTROLLER") == "gloo":  # horovodrun --gloo
        if not gloo_built:
            return ("horovodrun --gloo started this rank but Horovod was built without Gloo: launch "
                    "with mpirun or srun --mpi=pmix, or rebuild Horovod with HOROVOD_WITH_GLOO=1")
        return ""
    by_mpi = any(var in env for var in MPI_RANK_VARS)
    tasks = env.get("SLURM_STEP_NUM_TASKS", "1")
    if not by_mpi and "SLURM_STEP_ID" in env and tasks.isdigit() and int(tasks) > 1:
        return (f"srun started {tasks} tasks without an MPI plugin, so each would train alone as "
                f"rank 0: use `srun --mpi=pmix` (`srun --mpi=list` shows what the cluster has)")
    if not mpi_built:
        how = "this run was launched by MPI (mpirun or srun)" if by_mpi else "training needs it"
        return (f"Horovod was built without MPI but {how}: rebuild Horovod with HOROVOD_WITH_MPI=1 "
                f"(scripts/setup.sh does), or launch with `horovodrun --gloo`")
    return ""


def check_launch(env: Mapping[str, str], mpi_built: bool, gloo_built: bool) -> None:
    """Raise UserError (one line, reported by the CLI with exit status 2) if the launch is bad."""
    problem = launch_problem(env, mpi_built, gloo_built)
    if problem:
        raise UserError(problem)
