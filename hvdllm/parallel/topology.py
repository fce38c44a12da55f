"""The rank grid at run time: communicators and Horovod process sets for P stages x R replicas.

The arithmetic (which rank is which stage and replica) is hvdllm.layout's; here it becomes
communicators. Rank r sits at stage r % P of replica r // P:

    stage:        0   1   2   3        (P = 4, R = 2, world = 8)
    replica 0:    0   1   2   3   <- pipeline communicator of replica 0
    replica 1:    4   5   6   7
                  ^
                  stage communicator of stage 0 (ranks 0 and 4) = a Horovod process set

Under MPI (mpirun, srun, horovodrun --mpi) the communicators come from mpi4py's Comm.Split and the
Horovod process sets hold the same ranks, so each stage's gradients are all-reduced among that
stage's replicas only. Under `horovodrun --gloo` there is no MPI: data parallelism works, pipelines
(which need point-to-point messages) do not.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import horovod.torch as hvd
import numpy as np
import torch

from hvdllm.errors import UserError
from hvdllm.launch.checks import check_launch
from hvdllm.layout import Layout
from hvdllm.parallel.watchdog import Watchdog


@dataclass
class Topology:
    layout: Layout
    """The job's layout on this world (stages, replicas, micro-batches)."""
    rank: int
    stage: int
    replica: int
    local_rank: int
    local_size: int
    """Ranks on this node (to split its cores between them)."""
    process_set: Any
    """Horovod process set of this rank's stage: its gradient all-reduce group."""
    stage_comm: Any = None
    """mpi4py communicator of the R replicas of this rank's stage (None under Gloo)."""
    pipe_comm: Any = None
    """mpi4py communicator of the P stages of this rank's replica, ordered by stage."""
    world_comm: Any = None
    """mpi4py COMM_WORLD (None under Gloo)."""
    embed_set: Any = None
    """Horovod process set of this replica's first and last stage (the tied embedding's gradient
    sum; P > 1, those two stages only): NCCL on GPUs, MPI on CPUs."""
    watchdog: Watchdog | None = None
    """Ends the job when a wait on other ranks exceeds the peer timeout."""

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def stages(self) -> int:
        return self.layout.stages

    @property
    def replicas(self) -> int:
        return self.layout.replicas

    def waiting(self, what: str) -> contextlib.AbstractContextManager:
        """Guard a blocking wait on other ranks with the watchdog."""
        return self.watchdog.guard(what) if self.watchdog else contextlib.nullcontext()

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.stages - 1

    def rank0_decides(self, what: str, decide: Callable[[], Any]) -> Any:
        """Run `decide` on rank 0 only and hand its result to every rank; a UserError it raises
        is raised on every rank (so all stop with the same one line, none left waiting)."""
        result, error = None, ""
        if self.rank == 0:
            try:
                result = decide()
            except UserError as e:
                error = str(e)
        with self.waiting(f"rank 0 to decide {what}"):
            result, error = hvd.broadcast_object((result, error), root_rank=0, name=f"decide.{what}")
        if error:
            raise UserError(error)
        return result

    def world_max(self, value: float) -> float:
        """Maximum of a scalar over every rank (all stages and replicas)."""
        return self.world_maxima([value])[0]

    def world_maxima(self, values: list[float]) -> list[float]:
        """Elementwise maximum of a few scalars over every rank, in one exchange."""
        with self.waiting("the other ranks (world maximum)"):
            if self.world_comm is not None:  # mpi4py: a few microseconds on one node
                from mpi4py import MPI

                out = np.array(values, dtype=np.float64)
                self.world_comm.Allreduce(MPI.IN_PLACE, out, op=MPI.MAX)
                return out.tolist()
            return hvd.allreduce(torch.tensor(values, dtype=torch.float64), op=hvd.Max,
                                 name="world_max", process_set=hvd.global_process_set).tolist()

    def sum_over_stages(self, value: float) -> float:
        """Sum of a scalar over the stages of this rank's replica (identity with one stage)."""
        if self.stages == 1:
            return float(value)
        from mpi4py import MPI

        with self.waiting("the other stages (sum)"):
            return float(self.pipe_comm.allreduce(float(value), op=MPI.SUM))

    def from_last_stage(self, value: float) -> float:
        """The last stage's value of a scalar, on every stage of the replica."""
        if self.stages == 1:
            return float(value)
        with self.waiting("the last stage (broadcast)"):
            return float(self.pipe_comm.bcast(float(value), root=self.stages - 1))

    def replica_sum(self, value: float) -> float:
        """Sum of a scalar over this stage's replicas.

        mpi4py on the stage communicator, in this thread, like the other scalar exchanges here:
        Horovod's background thread is left to the gradients (see docs/parallelism.md, ZeRO-1).
        """
        with self.waiting("the other replicas (sum)"):
            if self.stage_comm is not None:
                return float(self.stage_comm.allreduce(float(value)))
            return float(hvd.allreduce(torch.tensor([float(value)], dtype=torch.float64),
                                       op=hvd.Sum, name="replica_sum",
                                       process_set=self.process_set)[0])

    def replica_mean(self, value: float) -> float:
        """Mean of a scalar over this stage's replicas."""
        return self.replica_sum(value) / self.replicas

    def describe(self) -> str:
        return self.layout.describe()


def launched_with_gloo() -> bool:
    """horovodrun --gloo starts ranks without MPI and tells Horovod so through the environment."""
    return os.environ.get("HOROVOD_CONTROLLER") == "gloo"


def init_distributed(layout_for: Callable[[int], Layout], peer_timeout_s: float = 300.0) -> Topology:
    """Initialise Horovod (on top of mpi4py's MPI unless launched by Gloo) and build the grid.

    layout_for(world size) gives the job's layout (hvdllm.layout), or raises saying why not.
    """
    check_launch(os.environ, mpi_built=hvd.mpi_built(), gloo_built=hvd.gloo_built())
    if launched_with_gloo():
        hvd.init()
        return gloo_topology(layout_for, _watchdog(hvd.rank(), 0, hvd.rank(), peer_timeout_s))

    from mpi4py import MPI  # initialises MPI with MPI_THREAD_MULTIPLE, which Horovod needs

    world_comm = MPI.COMM_WORLD
    rank, world = world_comm.Get_rank(), world_comm.Get_size()
    layout = layout_for(world)
    stages = layout.stages
    stage, replica = layout.position(rank)
    # Comm.Split: ranks with the same color share a communicator; key orders them inside it.
    stage_comm = world_comm.Split(color=stage, key=replica)
    pipe_comm = world_comm.Split(color=replica, key=stage)
    warm_up_object_collectives([world_comm, stage_comm, pipe_comm])
    # Horovod's process sets must be listed identically on every rank: each stage's replicas (its
    # gradient exchange), then each replica's two end stages (its tied embedding), unless those
    # two are the whole world (P = 2, R = 1: the global set).
    embed_set = None
    if stages == 1:
        hvd.init(comm=world_comm)
        process_set = hvd.global_process_set
    else:
        sets = [hvd.ProcessSet(layout.stage_ranks(s)) for s in range(stages)]
        ends = [[layout.replica_ranks(r)[0], layout.replica_ranks(r)[-1]]
                for r in range(layout.replicas)]
        end_sets = [hvd.ProcessSet(e) for e in ends] if world > 2 else []  # 2: the world
        hvd.init(comm=world_comm, process_sets=sets + end_sets)
        process_set = sets[stage]
        if stage in (0, stages - 1):
            embed_set = end_sets[replica] if end_sets else hvd.global_process_set
    return Topology(layout=layout, rank=rank, stage=stage, replica=replica,
                    local_rank=hvd.local_rank(), local_size=hvd.local_size(),
                    process_set=process_set, stage_comm=stage_comm, pipe_comm=pipe_comm,
                    world_comm=world_comm,
                    embed_set=embed_set,
                    watchdog=_watchdog(rank, stage, replica, peer_timeout_s))


def gloo_topology(layout_for: Callable[[int], Layout], watchdog: Watchdog | None) -> Topology:
    """The grid of an initialised Horovod without MPI: one stage, every rank a replica."""
    layout = layout_for(hvd.size())
    if layout.stages > 1:
        raise UserError("pipeline stages need MPI point-to-point messages: launch with mpirun, "
                         "srun or horovodrun --mpi instead of horovodrun --gloo")
    return Topology(layout=layout, rank=hvd.rank(), stage=0, replica=hvd.rank(),
                    local_rank=hvd.local_rank(), local_size=hvd.local_size(),
                    process_set=hvd.global_process_set, watchdog=watchdog)


def warm_up_object_collectives(comms: list) -> None:
    """One object collective on each communicator, in the same order on every rank, before
    Horovod starts.

    mpi4py's first object collective (allreduce, bcast, ...) on a communicator duplicates it for
    its own messages (MPI_Comm_dup, collective over the communicator) and waits for that while
    holding the GIL. During training that wait can be on a rank still inside a Horovod collective,
    whose background thread in turn needs this rank's background thread, which needs the GIL to
    release a finished tensor: a deadlock (seen with ZeRO-1 on a 2 x 2 grid, 3 launches in 35;
    py-spy --native stacks in docs/parallelism.md). Done here, no Horovod collective is in flight.
    """
    from mpi4py import MPI

    for comm in comms:
        if comm != MPI.COMM_NULL:
            comm.allreduce(0)


def _watchdog(rank: int, stage: int, replica: int, timeout_s: float) -> Watchdog | None:
    if timeout_s <= 0:
        return None  # parallel.peer_timeout_s = 0: wait forever
    return Watchdog(timeout_s, f"stage {stage} of replica {replica} (rank {rank})", abort_world)


ABORT_GRACE_S = 20
"""How long MPI_Abort may take before the kernel ends this process (SIGALRM)."""


def abort_world(code: int = 1) -> None:
    """End every rank now (a failing rank must not leave the others waiting in a collective).

    MPI_Abort asks the launcher to end every rank; with a host unreachable (a cut link) that
    request can itself hang. An alarm bounds it: SIGALRM's default action ends the process
    (exit by signal 14) even if the abort never returns and holds the interpreter."""
    import signal
    import sys

    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
            signal.alarm(ABORT_GRACE_S)  # no handler is installed for SIGALRM: it terminates
            MPI.COMM_WORLD.Abort(code)
    os._exit(code)  # Gloo / single process: horovodrun ends the other ranks when one exits
