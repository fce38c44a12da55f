"""Elastic data parallelism on namespace hosts: horovodrun --gloo --min-np/--max-np with a host
discovery script (hvdllm.train.elastic). Horovod blacklists the whole host of a failed worker, so
each worker has a host of its own. Every launch has a wall-clock bound; the hosts' teardown ends
whatever a failed test left running in them.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import BIN, TINY, hvdllm, mpirun, read_jsonl, read_metrics, run, train_losses
from host_launch import start_in_host, wait_for

from hvdllm.checkpoint import Checkpoint, CheckpointManager
from hvdllm.launch.hosts import cleanup_leftovers, namespace_hosts, unusable_reason

pytestmark = pytest.mark.elastic

if reason := unusable_reason():
    pytest.skip(f"{reason}: the elastic tests make network namespaces", allow_module_level=True)

PREFIX = "hvde"
COMMIT_EVERY = 5
LAUNCH_TIMEOUT_S = 240
SETS = ("training.threads=1", "training.log_every=1", f"parallel.elastic_commit_every={COMMIT_EVERY}",
        "parallel.peer_timeout_s=60", "training.keep_checkpoints=1000")


@pytest.fixture(params=[2])
def hosts(request, tmp_path):
    """Unshaped namespace hosts (2, or as the test's parametrize says), an ssh stand-in for
    horovodrun and a discovery script that prints the addresses in tmp_path/hosts.txt (the test
    edits that file to add a host)."""
    cleanup_leftovers(PREFIX)
    with namespace_hosts(request.param, prefix=PREFIX) as made:
        ssh_dir = made.write_ssh(tmp_path / "ssh")
        discover = tmp_path / "discover.sh"
        discover.write_text(f"#!/bin/sh\ncat {tmp_path / 'hosts.txt'}\n")
        discover.chmod(0o755)
        yield made, ssh_dir, discover


def list_hosts(tmp_path: Path, hosts) -> None:
    """What the discovery script prints from now on: one slot on each of `hosts`."""
    tmp = tmp_path / "hosts.txt.new"
    tmp.write_text("".join(f"{h.address}:1\n" for h in hosts))
    tmp.rename(tmp_path / "hosts.txt")


def horovodrun_elastic(made, ssh_dir, discover, np: int, *train_args) -> list:
    """horovodrun's elastic launch, started in the first host (its driver must be reachable)."""
    return ["env", f"PATH={ssh_dir}:{BIN}:{os.environ['PATH']}", BIN / "horovodrun", "--gloo",
            "-np", str(np), "--min-np", "1", "--max-np", "2", "--host-discovery-script", discover,
            "--network-interface", "eth0", "--start-timeout", "60",
            *hvdllm("train", TINY, *train_args)]


def resets(run_dir: Path) -> list[dict]:
    path = run_dir / "elastic.jsonl"
    return read_jsonl(path) if path.is_file() else []


def run_elastic(made, cmd: list, log_path: Path, event, timeout_s: float = LAUNCH_TIMEOUT_S) -> int:
    """Start the launch in the first host, call event() once while it runs, wait for its end."""
    with open(log_path, "w") as log:
        job = start_in_host(made[0], cmd, log)
        try:
            event(log)
            job.wait(timeout=timeout_s)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
    return job.returncode


def worker_pids(host) -> list[int]:
    return [pid for pid in host.pids()
            if b"hvdllm" in Path(f"/proc/{pid}/cmdline").read_bytes() and b"horovodrun"
            not in Path(f"/proc/{pid}/cmdline").read_bytes()]


def tensorboard_scalars(run_dir: Path, *tags: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} as TensorBoard's own reader shows the run (after its purges)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in tags:
        events = acc.Scalars(tag)
        assert len({e.step for e in events}) == len(events), f"{tag}: a step shown twice"
        out[tag] = {e.step: e.value for e in events}
    return out


def model_tensors(run_dir: Path) -> dict:
    ckpt = Checkpoint(CheckpointManager(run_dir).complete()[-1])
    names = [n for entry in ckpt.entries("model").values() for n in entry["names"]]
    return ckpt.load_named("model", names, {})


def freeze_in_a_checkpoint(workers, run_dir: Path) -> tuple[list[int], int]:
    """SIGSTOP every worker while a checkpoint is being written (its step_*.tmp folder exists
    after all are stopped; else let them go and try the next one). Returns (pids, its step)."""
    def writing() -> list[Path]:
        return sorted((run_dir / "checkpoints").glob("step_*.tmp"))

    for _ in range(200):
        wait_for(lambda: bool(writing()), 60, "a checkpoint being written")
        pids = [pid for host in workers for pid in worker_pids(host)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        if tmp := writing():
            return pids, int(tmp[0].name[len("step_"):-len(".tmp")])
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    raise AssertionError("never caught the workers inside a checkpoint write")


def test_lost_host_rolls_back_to_the_commit_and_finishes(hosts, tiny_args, tmp_path):
    """The second host's worker is killed while a checkpoint is being written: the survivor
    rolls back to the last commit and finishes every step alone; the checkpoint before the one
    cut short is intact, and every complete checkpoint verifies. Against a reference that ran 2
    ranks up to that commit (a checkpoint) and 1 rank from it: the same loss at every step and
    the same final weights, tolerance 1e-6 relative (measured: identical; both sum the same two
    gradients in the 2-rank part and accumulate the same two micro-batches in the 1-rank part)."""
    made, ssh_dir, discover = hosts
    list_hosts(tmp_path, made)
    steps = 300
    args = tiny_args("elastic", *SETS, f"training.steps={steps}", "training.checkpoint_every=1")
    run_dir = tmp_path / "elastic"
    cut: list[int] = []

    def kill_second_worker_in_a_checkpoint(log):
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file()
                 and len(read_metrics(run_dir)) >= 23, 150, "23 steps on 2 workers", log)
        frozen, step = freeze_in_a_checkpoint(made, run_dir)
        cut.append(step)
        for pid in worker_pids(made[1]):
            os.kill(pid, signal.SIGKILL)
        for pid in frozen:
            if pid in worker_pids(made[0]):
                os.kill(pid, signal.SIGCONT)

    code = run_elastic(made, horovodrun_elastic(made, ssh_dir, discover, 2, *args),
                       tmp_path / "elastic.log", kill_second_worker_in_a_checkpoint)
    log = (tmp_path / "elastic.log").read_text()
    assert code == 0, log[-5000:]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), "a step missing or repeated"
    starts = resets(run_dir)
    assert [r["world_size"] for r in starts] == [2, 1], starts
    commit = starts[1]["step"]
    assert commit % COMMIT_EVERY == 0 and commit >= 20, starts
    assert {r["world_size"] for r in rows if r["step"] <= commit} == {2}
    assert {r["world_size"] for r in rows if r["step"] > commit} == {1}
    tb = tensorboard_scalars(run_dir, "train/loss", "train/world_size")
    assert sorted(tb["train/loss"]) == list(range(1, steps + 1))  # redone steps replaced, once
    jsonl = train_losses(run_dir)  # TensorBoard keeps float32: equal to its rounding
    assert all(tb["train/loss"][s] == pytest.approx(jsonl[s], rel=1e-6) for s in jsonl)
    assert {s: int(v) for s, v in tb["train/world_size"].items()} == {
        r["step"]: r["world_size"] for r in rows}
    saved = CheckpointManager(run_dir).complete()
    assert CheckpointManager(run_dir).path(cut[0] - 1) in saved  # the one before the cut
    assert not list((run_dir / "checkpoints").glob("step_*.tmp"))  # the cut one was cleared
    for path in saved:  # checksums verified while reading
        Checkpoint(path).load_named("model", ["transformer.wte.weight"], {})

    ref = tmp_path / "ref"
    ref_args = tiny_args("ref", *SETS, f"training.steps={steps}",
                         f"training.checkpoint_every={COMMIT_EVERY}")
    mpirun(2, hvdllm("train", TINY, *ref_args), timeout=LAUNCH_TIMEOUT_S)  # 2 ranks throughout
    run(hvdllm("train", TINY, *ref_args, "--resume", CheckpointManager(ref).path(commit)),
        timeout=LAUNCH_TIMEOUT_S)  # 1 rank from the commit: its rows replace the 2 ranks' after it
    mine, theirs = train_losses(run_dir), train_losses(ref)
    worst = max(abs(mine[s] - theirs[s]) / abs(theirs[s]) for s in theirs)
    assert theirs.keys() == mine.keys() and worst <= 1e-6, worst
    final, reference = model_tensors(run_dir), model_tensors(ref)
    assert max(float((final[n] - reference[n]).abs().max()) for n in reference) <= 1e-6


@pytest.mark.parametrize("hosts", [3], indirect=True)
def test_new_host_grows_the_world(hosts, tiny_args, tmp_path):
    """Start on one host; a second appears in the discovery output: a worker starts there, the
    world grows to 2 at the next commit and training continues to the last step. horovodrun
    runs on a third host, a launch node outside the list: Horovod 0.28.1 refuses a list of only
    its own host with --network-interface ("No interface is found for address 127.0.0.1")."""
    made, ssh_dir, discover = hosts
    workers = [made[1], made[2]]
    list_hosts(tmp_path, workers[:1])
    steps = 400
    run_dir = tmp_path / "grow"
    args = tiny_args("grow", *SETS, f"training.steps={steps}", "training.checkpoint_every=100")

    def add_second_host(log):
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file()
                 and len(read_metrics(run_dir)) >= 10, 150, "10 steps on one worker", log)
        list_hosts(tmp_path, workers)
        wait_for(lambda: len(resets(run_dir)) >= 2, 120, "the world to grow", log)

    started = time.monotonic()
    code = run_elastic(made, horovodrun_elastic(made, ssh_dir, discover, 1, *args),
                       tmp_path / "grow.log", add_second_host)
    log = (tmp_path / "grow.log").read_text()
    assert code == 0, log[-5000:]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    starts = resets(run_dir)
    assert [r["world_size"] for r in starts] == [1, 2], starts
    grown = starts[1]["step"]
    assert starts[1]["redo_steps"] == 0  # a host change is seen at a commit: nothing to redo
    assert {r["world_size"] for r in rows if r["step"] > grown} == {2}
    assert time.monotonic() - started < LAUNCH_TIMEOUT_S
