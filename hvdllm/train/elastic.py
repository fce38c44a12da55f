"""Elastic data parallelism: `hvdllm train` under horovodrun's elastic mode (docs/elastic.md).

`horovodrun --gloo --min-np A --max-np B --host-discovery-script S` re-forms the world when a
worker is lost or a host appears. What happens on each rank, in order:

  start    build the model, optimizer and scaler locally and, with --resume, read the newest
           checkpoint this rank can. No collective here: a worker that joins later runs this
           same start while the others wait in a reset.
  sync     rank 0's committed state goes to every rank (ElasticState.sync): weights, optimizer
           state (sent whole, so a fresh optimizer takes no zero-gradient step), step, loss
           scale, skipped steps.
  reshape  what depends on the world size is rebuilt: the grid, the micro-batches (the global
           batch stays what the job says), the replica-scaled learning rate, the fp16
           pre-divide factor. metrics.jsonl and TensorBoard drop rows after the committed step.
  train    the usual loop (loop.run_steps), committing the state to memory every
           parallel.elastic_commit_every steps; at a commit Horovod also checks for new hosts.
  reset    a lost worker fails a collective (HorovodInternalError): the survivors roll back to
           the last commit. A host change seen at a commit (HostsUpdatedInterrupt): nothing to
           roll back. Horovod re-initialises and it goes on from sync.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time

import horovod.torch as hvd
from horovod.common.elastic import State
from horovod.common.exceptions import HostsUpdatedInterrupt

from hvdllm.config import JobConfig, dump_toml
from hvdllm.data import load_prepared
from hvdllm.errors import UserError
from hvdllm.layout import Layout, LayoutError, job_layout
from hvdllm.launch.checks import check_launch
from hvdllm.log import logger, setup_logging
from hvdllm.metrics import MetricsWriter
from hvdllm.optim import LRSchedule, scaled_peak_lr
from hvdllm.parallel.data_parallel import broadcast_parameters
from hvdllm.parallel.topology import gloo_topology
from hvdllm.parallel.watchdog import Watchdog
from hvdllm.preemption import StopRequest
from hvdllm.train.loop import due, run_steps, write_run_info
from hvdllm.train.resume import restore_locally, save_checkpoint
from hvdllm.train.run_dir import claim_run_dir
from hvdllm.train.trainer import Trainer, adopt_counters, build_trainer, pick_device, schedule_runner


def launched_elastic() -> bool:
    """horovodrun with --min-np, --max-np or --host-discovery-script tells its workers so."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


def check_elastic_job(job: JobConfig) -> None:
    """What elastic mode cannot run, refused before anything starts."""
    if job.parallel.pipeline_stages > 1:
        raise UserError("pipeline stages cannot run elastic: they need MPI point-to-point "
                        "messages and Horovod's elastic mode runs on Gloo; set "
                        "parallel.pipeline_stages = 1 or launch with mpirun/srun")
    if job.parallel.zero:
        raise UserError("parallel.zero = 1 cannot run elastic: a worker holds the only copy of "
                        "its slice of the optimizer state, which a lost worker takes with it; "
                        "set parallel.zero = 0")
    if not (job.data_dir / "meta.json").is_file():
        raise UserError(f"no prepared data in {job.data_dir}: run `hvdllm prepare` before an "
                        "elastic launch (a worker that joins later must not prepare it again)")


def horovod_timeouts(peer_timeout_s: float) -> None:
    """Make a lost or silent peer Horovod's error (which resets the world) rather than a hang:
    Gloo's socket timeout and Horovod's stall shutdown follow parallel.peer_timeout_s, unless
    the environment sets them. Before hvd.init, which reads them."""
    if peer_timeout_s <= 0:
        return
    seconds = math.ceil(peer_timeout_s)
    os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", str(seconds))
    os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(max(1, seconds // 2)))
    os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(seconds))


def last_resort_watchdog(peer_timeout_s: float) -> Watchdog | None:
    """Twice the peer timeout without Horovod turning a wait into a reset: this worker ends, and
    the others reset without it (horovodrun counts it as failed)."""
    if peer_timeout_s <= 0:
        return None
    return Watchdog(2 * peer_timeout_s, "this worker", lambda code: os._exit(code),
                    reaction="ending this worker (elastic: the others go on without it)")


class ElasticState(State):
    """What survives a reset, committed in memory: weights, optimizer state, loss scaler, step,
    skipped-step count. The data position and the learning rate follow from the step."""

    def __init__(self, t: Trainer) -> None:
        super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank)
        self.t = t
        self.step = t.start_step
        """Steps done at the last commit (or sync): where a reset goes on from."""
        self.reached = t.start_step
        """Steps this process has trained (beyond `step` until the next commit)."""
        self.claimed = False
        """Rank 0 checked the run directory (once per job: never rolled back)."""
        self.interrupted: float | None = None
        """perf_counter() when this process last saw a lost worker or a host change."""
        self.save()

    def counters(self) -> dict:
        return {"step": self.step, "skipped_steps": self.t.skipped_steps,
                "scaler": self.t.scaler.state_dict()}

    def save(self) -> None:
        t = self.t
        self._saved = {"model": {k: v.detach().clone() for k, v in t.model.state_dict().items()},
                       "optim": copy.deepcopy(t.optimizer.state_dict()), **self.counters()}

    def restore(self) -> None:
        """Back to the last commit (after a lost worker failed a collective)."""
        self.interrupted = time.perf_counter()
        saved, t = self._saved, self.t
        t.model.load_state_dict(saved["model"])
        t.optimizer.load_state_dict(saved["optim"])  # also clears Horovod's pending handles
        self._apply(saved)  # its step, skipped steps and loss scale

    def _apply(self, counters: dict) -> None:
        self.step = counters["step"]
        adopt_counters(self.t, counters)

    def sync(self) -> None:
        """Every rank takes rank 0's state (a joining worker has none; survivors agree already)."""
        t = self.t
        counters, self.claimed = hvd.broadcast_object((self.counters(), self.claimed),
                                                      root_rank=0, name="elastic.counters")
        self._apply(counters)
        broadcast_parameters(t.model, root_rank=0, process_set=hvd.global_process_set)
        # The optimizer state travels whole from rank 0: Horovod's broadcast_optimizer_state
        # would first step a fresh optimizer on zero gradients (AdamW's decay moves weights).
        optim = hvd.broadcast_object(t.optimizer.state_dict() if hvd.rank() == 0 else None,
                                     root_rank=0, name="elastic.optimizer")
        if hvd.rank() != 0:
            t.optimizer.load_state_dict(optim)
        self.save()

    def after_step(self, done: int) -> None:
        """Commit every parallel.elastic_commit_every steps (Horovod then checks for hosts)."""
        self.reached = done
        if due(done, self.t.job.parallel.elastic_commit_every, self.t.job.training.steps):
            self.step = done
            try:
                self.commit()
            except HostsUpdatedInterrupt:
                self.interrupted = time.perf_counter()
                raise


def reshape(t: Trainer) -> None:
    """Rebuild what depends on the world size, after every (re)start."""
    job = t.job
    t.topo = gloo_topology(lambda world: job_layout(job, world), t.topo.watchdog)
    setup_logging(t.topo.rank)
    peak_lr = scaled_peak_lr(job.optim, t.topo.replicas)
    t.schedule = LRSchedule(job.optim, peak_lr, job.training.steps)
    # Horovod's hooks: all-reduce after this many backward passes; fp16 pre-divide by replicas.
    t.sync.reshape(t.topo.layout.micro_batches, t.topo.replicas)
    t.scaler.world_max = t.topo.world_max
    t.runner = schedule_runner(job, t.topo, t.stage, t.scaler, t.device)
    t.val_batches = []  # cut again for the new replicas


def refuse_world(t: Trainer, state: ElasticState, error: LayoutError) -> None:
    """A world that cannot keep the global batch: checkpoint the committed state, stop."""
    world = hvd.size()
    t.topo.layout = Layout(world, 1, world, 1, t.job.training.global_batch_size // world)
    t.topo.rank = t.topo.replica = hvd.rank()
    save_checkpoint(t, state.step)
    raise UserError(f"elastic reset to {world} workers refused: {error} (the committed step "
                    f"{state.step} is checkpointed; resume with --resume auto)")


def record_reset(t: Trainer, state: ElasticState) -> None:
    """Rank 0: one row per (re)start in run_dir/elastic.jsonl, and the log line. reset_s: from
    the lost worker or host change this process saw to training again (Horovod's re-forming of
    the world, the sync and the reshape)."""
    redo = max(0, state.reached - state.step)
    reset_s = time.perf_counter() - state.interrupted if state.interrupted else None
    row = {"time": time.time(), "step": state.step, "world_size": t.topo.world,
           "redo_steps": redo, "reset_s": None if reset_s is None else round(reset_s, 3)}
    with (t.job.run_dir / "elastic.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    logger.info("elastic: %d worker(s) from step %d%s%s", t.topo.world, state.step,
                f", {redo} step(s) after the last commit to train again" if redo else "",
                f" (reset in {reset_s:.1f} s)" if reset_s is not None else "")


@hvd.elastic.run
def run_elastic(state: ElasticState, resume: str | None, fresh: bool,
                stop: StopRequest) -> dict[str, float]:
    """Entered after each sync: reshape, then train from the committed step."""
    t = state.t
    try:
        reshape(t)
    except LayoutError as e:
        refuse_world(t, state, e)
    if not state.claimed:  # the job's first start: rank 0 checks the run directory
        note = t.topo.rank0_decides("the run directory",
                                    lambda: claim_run_dir(t.job.run_dir, resume, fresh))
        if note:
            logger.info("%s", note)
        state.claimed = True
    t.start_step = state.step
    writer = None
    if t.topo.rank == 0:
        t.job.run_dir.mkdir(parents=True, exist_ok=True)
        (t.job.run_dir / "job.toml").write_text(dump_toml(t.job))
        write_run_info(t)
        record_reset(t, state)
        # Rows of steps after the commit are dropped: the steps trained again replace them.
        writer = MetricsWriter(t.job.run_dir, dump_toml(t.job), t.job.training.steps, state.step)
    state.reached = state.step
    try:
        return run_steps(t, writer, None, stop, after_step=state.after_step)
    finally:
        if writer:
            writer.close()


def train_elastic(job: JobConfig, resume: str | None, fresh: bool) -> dict[str, float]:
    """`hvdllm train` on a worker of an elastic launch (loop.train sends it here)."""
    stop = StopRequest()
    check_elastic_job(job)
    check_launch(os.environ, mpi_built=hvd.mpi_built(), gloo_built=hvd.gloo_built())
    horovod_timeouts(job.parallel.peer_timeout_s)
    hvd.init()  # Gloo, from horovodrun's rendezvous; no collective until run_elastic
    watchdog = last_resort_watchdog(job.parallel.peer_timeout_s)
    topo = gloo_topology(lambda world: job_layout(job, world), watchdog)
    setup_logging(topo.rank)
    if job.training.profile or job.parallel.horovod_timeline:
        logger.warning("training.profile and parallel.horovod_timeline are not recorded in "
                       "elastic mode")
    t = build_trainer(job, topo, pick_device(topo, job.training.threads), load_prepared(job))
    if resume is not None:
        t.start_step, saved = restore_locally(job, resume, t.data, t.stage, t.sync)
        adopt_counters(t, saved)
    return run_elastic(ElasticState(t), resume, fresh, stop)

