"""`hvdllm slurm` on a two-node Slurm: one slurmd in each of two namespace hosts, one slurmctld.

Every launcher runs a 2-node x 1-task job straight through, with the hosts' network named the
way a user names a cluster's interface ([slurm] env: OpenMPI's btl/oob_tcp_if_include); the
mpirun job is also stopped mid-run by the time-limit warning's signal (USR1 to the batch shell on
the first node). mpirun must forward it to the rank on the second node through its remote daemon;
both ranks checkpoint, the job requeues and resumes, and its per-step losses equal the straight
run's. The jobs run at the same time (tests/test_slurm.py has the one-node cases and the rest).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, ROOT, TINY, read_metrics, train_losses
from host_launch import wait_for
from hvdllm.launch.hosts import cleanup_leftovers, namespace_hosts, unusable_reason
from hvdllm.launch.slurm import LAUNCHERS
from slurm_cluster import SlurmCluster, missing_tools
from test_slurm import Job, job_env, run_all, world_sizes

pytestmark = pytest.mark.multihost

if reason := unusable_reason() or (missing_tools() and f"missing {missing_tools()}"):
    pytest.skip(f"{reason}: the two-node Slurm runs in network namespaces", allow_module_level=True)

PREFIX = "hvds"
STEPS = 40
NODES = {"nodes": 2, "tasks_per_node": 1}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two namespace hosts, each a Slurm node (leftovers of ended sessions are removed first)."""
    cleanup_leftovers(PREFIX)
    with namespace_hosts(2, prefix=PREFIX) as hosts:
        c = SlurmCluster(tmp_path_factory.mktemp("slurm-nodes"), hosts=hosts)
        try:
            c.start()
            yield c
        finally:
            c.stop()


@pytest.fixture(scope="module")
def jobs(cluster, tiny_data, tmp_path_factory) -> dict[str, Job]:
    base = tmp_path_factory.mktemp("slurm-nodes-jobs")
    hosts = cluster.hosts
    # What a user sets for a cluster's network: OpenMPI's TCP between nodes on the hosts' subnet
    # (by default it leaves out every 127/8 address). One thread per rank: two nodes, two cores.
    sets = (f'slurm.env=["OMPI_MCA_btl_tcp_if_include={hosts.network}", '
            f'"OMPI_MCA_oob_tcp_if_include={hosts.network}"]', "training.threads=1")
    env = job_env(cluster)  # horovodrun reaches the other node with `ssh`: the hosts' stand-in
    env["PATH"] = f"{hosts.write_ssh(base / 'ssh')}:{env['PATH']}"
    specs = {f"plain-{launcher}": (launcher, "", ()) for launcher in LAUNCHERS}
    specs["preempt-mpirun"] = ("mpirun", "mid", ("--batch", "--signal=USR1"))
    return run_all(base, {name: Job(cluster, base, name, launcher, tiny_data, when, how, steps=STEPS,
                                    sets=sets, layout=NODES, env=env)
                          for name, (launcher, when, how) in specs.items()})


def ranks_hosts(job: Job) -> list[str]:
    """The hostname each rank ran on (run_info.json's per-rank records, by rank)."""
    ranks = json.loads((job.run_dir / "run_info.json").read_text())["memory"]["ranks"]
    return [r["host"] for r in sorted(ranks, key=lambda r: r["rank"])]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_node_job_runs_a_rank_on_each_node(cluster, jobs, launcher):
    job = jobs[f"plain-{launcher}"]
    assert job.returncode == 0, job.describe()
    info = cluster.show_job(job.job_id)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "hvdhost[1-2]", info
    assert "2 node(s) x 1 task(s) = 2 ranks" in job.log("out")
    assert world_sizes(job.log("err")) == [2], job.describe()
    assert ranks_hosts(job) == [h.name for h in cluster.hosts]
    assert sorted(train_losses(job.run_dir)) == list(range(1, STEPS + 1))


def test_launchers_agree_step_by_step(jobs):
    """srun (PMIx) and mpirun both all-reduce through Horovod's MPI, horovodrun through Gloo: a
    sum of two fp32 operands is the same in any order, so the losses are equal, not just close."""
    losses = {launcher: train_losses(jobs[f"plain-{launcher}"].run_dir) for launcher in LAUNCHERS}
    assert losses["srun"] == losses["mpirun"] == losses["horovodrun"]


def test_warning_signal_reaches_both_nodes_checkpoints_requeues_and_resumes(cluster, jobs):
    job = jobs["preempt-mpirun"]
    assert job.returncode == 0, job.describe()
    info = cluster.show_job(job.job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    err = job.log("err")
    step = int(re.search(r"stopped by SIGUSR1 after step (\d+)", err)[1])
    assert 0 < step < STEPS and f"resumed from {job.run_dir}/checkpoints/step_{step:08d}" in err
    # Both ranks exit 75: the script's repeats of the signal (every 5 s) no longer kill a rank
    # that has stopped and is exiting (it ignores them: preemption.StopRequest.honoured).
    assert "stopped early (status 75); requeueing" in job.log("out"), job.describe()
    assert world_sizes(err) == [2, 2] and ranks_hosts(job) == [h.name for h in cluster.hosts]
    assert train_losses(job.run_dir) == train_losses(jobs["plain-mpirun"].run_dir)


def training_workers(host) -> list[int]:
    """The `hvdllm train` processes in a host (not its slurmd, not the shells around them)."""
    pids = []
    for pid in host.pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if any(a.endswith(b"/hvdllm") for a in argv[:2]) and b"train" in argv:
            pids.append(pid)
    return pids


def test_elastic_recipe_goes_on_without_a_drained_node(cluster, tiny_data, tmp_path):
    """slurm/elastic.sbatch on both nodes: the second is drained (slurm/elastic-hosts.sh stops
    listing it) and its worker killed; the first finishes every step alone, the job COMPLETED."""
    steps, run_dir = 300, tmp_path / "run"
    env = job_env(cluster)
    env.update(HVDLLM=str(BIN / "hvdllm"), HOROVODRUN=str(BIN / "horovodrun"), HVDLLM_JOB=str(TINY),
               HVDLLM_NETWORK_INTERFACE="eth0")
    env["PATH"] = f"{cluster.hosts.write_ssh(tmp_path / 'ssh')}:{env['PATH']}"
    sets = [a for s in (f"data.dir={tiny_data}", f"run.dir={run_dir}", f"training.steps={steps}",
                        "training.log_every=1", "training.threads=1",
                        "parallel.elastic_commit_every=5") for a in ("--set", s)]
    job = subprocess.Popen(["sbatch", "--wait", f"--output={tmp_path}/out",
                            ROOT / "slurm" / "elastic.sbatch", *sets], env=env, cwd=ROOT,
                           stdout=subprocess.DEVNULL, start_new_session=True)
    node = cluster.hosts[1].name

    def scontrol(*args: str) -> None:
        subprocess.run(["scontrol", *args], env=cluster.env(), check=True, timeout=30)

    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and len(read_metrics(run_dir)) >= 20,
                 180, "20 steps on both nodes")
        scontrol("update", f"NodeName={node}", "State=DRAIN", "Reason=elastic-test")
        for pid in training_workers(cluster.hosts[1]):
            os.kill(pid, signal.SIGKILL)
        assert job.wait(timeout=240) == 0, (tmp_path / "out").read_text()[-4000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        scontrol("update", f"NodeName={node}", "State=RESUME")
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, steps + 1))
    starts = [json.loads(line) for line in (run_dir / "elastic.jsonl").read_text().splitlines()]
    assert [s["world_size"] for s in starts] == [2, 1], starts
