"""Ranks on more than one host: namespace hosts on this machine (hvdllm.launch.hosts).

Each test makes its own hosts (prefix "hvdt", a random tag each) and removes them, also when it
fails; every launch has its own timeout, and run() kills what a timed-out launch started here,
while the hosts' teardown kills what it started inside them. Needs root, ip, tc and nsenter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BIN, TINY, env, hvdllm, mpirun, run, train_losses
from host_launch import launch_pids, logged_steps, start_in_host, wait_for
from hvdllm.launch.hosts import (STATE_DIR, NamespaceHosts, cleanup_leftovers, namespace_hosts,
                                 unusable_reason)

pytestmark = pytest.mark.multihost

if reason := unusable_reason():
    pytest.skip(f"{reason}: the multihost tests make network namespaces", allow_module_level=True)

PREFIX = "hvdt"
LAUNCH_TIMEOUT_S = 240
TRAIN = ("training.threads=1", "training.steps=10", "training.log_every=1")
"""One torch thread per rank in both layouts: the same arithmetic, whatever the host count."""
RANK_PROBE = ("import os, socket; r = os.environ['OMPI_COMM_WORLD_RANK']; "
              "open(os.path.join({out!r}, 'rank' + r), 'w').write(' '.join(("
              "socket.gethostname(), os.readlink('/proc/self/ns/net'), "
              "os.environ['OMPI_COMM_WORLD_LOCAL_SIZE'])))")
"""Each rank writes its hostname, network namespace and local size to its own file."""


def present(hosts: NamespaceHosts) -> list[str]:
    """Which of the hosts' namespaces and links `ip` lists now."""
    netns = run(["ip", "netns", "list"]).stdout
    links = run(["ip", "-o", "link", "show"]).stdout
    return ([h.netns for h in hosts if h.netns in netns]
            + [n for n in (hosts.bridge, *(h.peer for h in hosts)) if f" {n}:" in links
               or f" {n}@" in links])


@pytest.fixture
def two_hosts(tmp_path):
    """Two unshaped hosts and their rsh agent; leftovers of ended sessions are removed first."""
    cleanup_leftovers(PREFIX)
    with namespace_hosts(2, prefix=PREFIX) as hosts:
        yield hosts, hosts.write_agent(tmp_path)


def test_hosts_are_removed_even_when_the_body_raises():
    with pytest.raises(ZeroDivisionError):
        with namespace_hosts(2, rate="100mbit", prefix=PREFIX) as hosts:
            assert len(present(hosts)) == 5  # 2 namespaces, bridge, 2 veths
            for h in hosts:
                assert run(h.command("hostname")).stdout.strip() == h.name
                for tc in (["tc", "-n", h.netns, "qdisc", "show", "dev", "eth0"],
                           ["tc", "qdisc", "show", "dev", h.peer]):
                    assert "tbf" in run(tc).stdout and "100Mbit" in run(tc).stdout
            route = run(["ip", "-n", hosts[0].netns, "route", "get", hosts[1].address]).stdout
            assert "dev eth0" in route
            sleeper = subprocess.Popen(hosts[1].command("sleep", "600"))
            deadline = time.monotonic() + 10
            while sleeper.pid not in hosts[1].pids() and time.monotonic() < deadline:
                time.sleep(0.05)  # nsenter execs sleep: the same process, once it has entered
            assert sleeper.pid in hosts[1].pids()
            1 / 0
    assert sleeper.wait(timeout=10) == -9  # `ip netns delete` alone would have left it running
    assert present(hosts) == [] and hosts.leftovers() == []
    assert not (STATE_DIR / hosts.tag).exists()


def test_cleanup_removes_what_a_killed_owner_left():
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from hvdllm.launch.hosts import NamespaceHosts; "
         f"h = NamespaceHosts(2, prefix={PREFIX!r}); h.create(); print(h.tag, flush=True); "
         "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        tag = owner.stdout.readline().strip()
        assert tag.startswith(PREFIX), "the owner did not make its hosts"
        assert tag not in cleanup_leftovers(PREFIX)  # its owner lives: not a leftover
    finally:
        owner.kill()
        owner.wait()
    assert tag in cleanup_leftovers(PREFIX)
    names = run(["ip", "netns", "list"]).stdout + run(["ip", "-o", "link", "show"]).stdout
    assert tag not in names and not (STATE_DIR / tag).exists()


def test_mpirun_puts_the_ranks_in_different_hosts(two_hosts, tmp_path):
    hosts, agent = two_hosts
    out = tmp_path / "ranks"
    out.mkdir()
    ssh_like = run([agent, "-o", "BatchMode=yes", hosts[1].address, "hostname"]).stdout.strip()
    assert ssh_like == hosts[1].name  # options before the host are skipped, as ssh takes them
    assert run([agent, "otherhost", "true"], check=False).returncode == 255
    netns = [run(h.command("readlink", "/proc/self/ns/net")).stdout.strip() for h in hosts]
    assert netns[0] != netns[1]
    run(hosts[0].command("mpirun", *hosts.mpirun_args(agent, env=env()),
                         BIN / "python", "-c", RANK_PROBE.format(out=str(out))),
        timeout=LAUNCH_TIMEOUT_S)
    ranks = [(out / f"rank{r}").read_text().split() for r in range(2)]
    assert ranks == [[h.name, ns, "1"] for h, ns in zip(hosts, netns)]


@pytest.fixture(scope="module")
def one_host_losses(tiny_data, tmp_path_factory) -> dict[int, float]:
    """The reference: the same job as 2 ranks on this machine's own network (shared memory)."""
    run_dir = tmp_path_factory.mktemp("one-host") / "run"
    sets = [a for s in TRAIN for a in ("--set", s)]
    mpirun(2, hvdllm("train", TINY, "--set", f"data.dir={tiny_data}", "--set", f"run.dir={run_dir}",
                     *sets), timeout=LAUNCH_TIMEOUT_S)
    return train_losses(run_dir)


def assert_same_losses(across: dict[int, float], local: dict[int, float]) -> None:
    """Tolerance 1e-6 relative, per step; measured: identical. Both layouts all-reduce the same
    two fp32 gradient buffers (TCP between hosts, shared memory within one), and a sum of two
    operands is the same in any order, so only a different reduction (3+ ranks) could differ."""
    assert sorted(local) == list(range(1, 11)) and across.keys() == local.keys()
    worst = max(abs(across[s] - local[s]) / abs(local[s]) for s in local)
    assert worst <= 1e-6, (worst, across, local)


def test_loss_parity_two_hosts_one_rank_each_vs_one_host_two_ranks(two_hosts, tiny_args, tmp_path,
                                                                   one_host_losses):
    hosts, agent = two_hosts
    run(hosts[0].command("mpirun", *hosts.mpirun_args(agent, env=env()),
                         *hvdllm("train", TINY, *tiny_args("hosts", *TRAIN))),
        timeout=LAUNCH_TIMEOUT_S)
    assert_same_losses(train_losses(tmp_path / "hosts"), one_host_losses)
    assert json.loads((tmp_path / "hosts" / "run_info.json").read_text())["world"] == 2


def horovodrun_in_hosts(hosts: NamespaceHosts, ssh_dir, controller: str, *cmd) -> None:
    """`horovodrun --gloo|--mpi` started in the first host, one rank per host, reaching the
    other through the ssh stand-in (first on PATH) over the eth0 every host has."""
    e = env()
    e["PATH"] = f"{ssh_dir}:{e['PATH']}"
    hosts_arg = ",".join(f"{h.address}:1" for h in hosts)
    run(hosts[0].command("env", f"PATH={e['PATH']}", BIN / "horovodrun", f"--{controller}",
                         "-np", "2", "-H", hosts_arg, "--network-interface", "eth0",
                         "--start-timeout", "60", *cmd),
        timeout=LAUNCH_TIMEOUT_S)


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_horovodrun_across_hosts_matches_one_host(controller, two_hosts, tiny_args, tmp_path,
                                                  one_host_losses):
    """horovodrun's own ssh launch, over Gloo (needs patches/horovod/0002: without it the global
    process set's Gloo context has no interface, and the rank aborts, "Unable to find address
    for: hvdhost1") and over MPI; the losses equal one host's 2 ranks."""
    hosts, _agent = two_hosts
    ssh_dir = hosts.write_ssh(tmp_path / "ssh")
    horovodrun_in_hosts(hosts, ssh_dir, controller,
                        *hvdllm("train", TINY, *tiny_args("hosts", *TRAIN)))
    assert_same_losses(train_losses(tmp_path / "hosts"), one_host_losses)


PEER_TIMEOUT_S = 10


def train_across(hosts, agent, tiny_args, name: str, *sets: str, resume: bool = False) -> list:
    args = tiny_args(name, "training.threads=1", "training.log_every=1",
                     f"parallel.peer_timeout_s={PEER_TIMEOUT_S}", *sets)
    return ["mpirun", *hosts.mpirun_args(agent, env=env()), *hvdllm("train", TINY, *args),
            *(["--resume", "auto"] if resume else [])]


def test_cut_link_ends_every_rank_with_what_it_waited_for(two_hosts, tiny_args, tmp_path):
    """The second host's link goes down mid-run: each rank's watchdog fires after the peer
    timeout and aborts; MPI_Abort towards an unreachable host is bounded (ABORT_GRACE_S), and
    mpirun notices the lost host (hosts.OOB_KEEPALIVE): every rank, mpirun and its daemons are
    gone within peer_timeout_s + 30 s."""
    hosts, agent = two_hosts
    run_dir = tmp_path / "cut"
    with open(tmp_path / "cut.log", "w") as log:
        job = start_in_host(hosts[0], train_across(hosts, agent, tiny_args, "cut",
                                                   "training.steps=100000"), log)
        try:
            wait_for(lambda: logged_steps(run_dir) >= 5, 120, "five steps", log)
            run(["ip", "link", "set", hosts[1].peer, "down"])
            cut = time.monotonic()
            wait_for(lambda: not launch_pids(hosts), PEER_TIMEOUT_S + 30,
                     "every rank, mpirun and its daemons to end", log)
            assert job.wait(timeout=max(1, cut + PEER_TIMEOUT_S + 30 - time.monotonic())) != 0
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    # Whichever notices first says what was lost: a rank's watchdog (what it waited for, in which
    # step) or mpirun (the daemon, on which host, it lost).
    output = (tmp_path / "cut.log").read_text()
    watchdog = f"waited {PEER_TIMEOUT_S} s for" in output and "ending the job" in output
    assert watchdog or "lost communication with a remote daemon" in output, output[-3000:]


def test_dead_host_ends_the_job_and_resume_continues(two_hosts, tiny_args, tmp_path):
    """Every rank of the second host killed: the job ends everywhere within 30 s (its orted
    reports the death; mpirun ends the rest); `--resume auto` on the same hosts continues
    from the last checkpoint to the end."""
    hosts, agent = two_hosts
    run_dir = tmp_path / "dead"
    sets = ("training.steps=1500", "training.checkpoint_every=10")
    with open(tmp_path / "dead.log", "w") as log:
        job = start_in_host(hosts[0], train_across(hosts, agent, tiny_args, "dead", *sets), log)
        try:
            wait_for(lambda: logged_steps(run_dir) >= 25, 120, "25 steps", log)
            for pid in hosts[1].pids():  # its rank (orted is not a rank: it reports the death)
                if b"hvdllm" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not launch_pids(hosts) and job.poll() is not None, 30,
                     "the job to end everywhere", log)
            assert job.returncode != 0
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    saved = max(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert saved >= 20
    run(hosts[0].command(*train_across(hosts, agent, tiny_args, "dead", *sets, resume=True)),
        timeout=LAUNCH_TIMEOUT_S)
    steps = sorted(train_losses(run_dir))
    assert steps == list(range(1, 1501))  # the resumed run replaced what came after `saved`


def test_host_sysctls_stay_inside_the_hosts():
    key = "net.ipv4.tcp_slow_start_after_idle"
    mine = run(["sysctl", "-n", key]).stdout.strip()
    with namespace_hosts(1, prefix=PREFIX, sysctls={key: str(1 - int(mine))}) as hosts:
        assert run(hosts[0].command("sysctl", "-n", key)).stdout.strip() == str(1 - int(mine))
    assert run(["sysctl", "-n", key]).stdout.strip() == mine


def test_network_bench_has_every_place_and_row(tiny_data, tmp_path):
    """`hvdllm bench --hosts 2`: one host's rows and a link's rows from real launches in one run
    (their speed is the bench's to report, not a test's to assert); the bytes and their cost at
    the link's rate follow from the gradients' payload."""
    out = tmp_path / "bench"
    cleanup_leftovers("hvdb")  # the bench's own prefix: what a killed bench left behind
    try:
        run(hvdllm("bench", TINY, "--set", f"data.dir={tiny_data}", "--hosts", "2", "--links",
                   "100mbit", "--tcp-tuned", "--quick", "--steps", "2", "--out", out),
            timeout=LAUNCH_TIMEOUT_S)
        assert not cleanup_leftovers("hvdb")  # the bench removed its hosts itself
    finally:
        cleanup_leftovers("hvdb")
    s = json.loads((out / "bench-network.json").read_text())
    rows = {(r["place"], r["name"]): r for r in s["rows"]}
    kinds = ("2 ranks Horovod", "2 ranks Horovod fp16 compression",
             "2 ranks Horovod bf16 compression", "2 ranks Horovod Gloo", "2 ranks torch DDP")
    assert rows.keys() == {("one host", "1 rank"), *((p, k) for p in ("one host", "100mbit")
                                                     for k in kinds)}
    plain, fp16 = rows[("100mbit", kinds[0])], rows[("100mbit", kinds[1])]
    info = json.loads((out / "runs" / "one_host-2_ranks_Horovod-0" / "run_info.json").read_text())
    assert plain["sent_bytes_per_rank"] == info["allreduce_payload_bytes_rank0"]  # 2 (N-1)/N = 1
    assert fp16["sent_bytes_per_rank"] == plain["sent_bytes_per_rank"] / 2
    assert rows[("100mbit", kinds[2])]["sent_bytes_per_rank"] == fp16["sent_bytes_per_rank"]
    gloo = json.loads((out / "runs" / "100mbit-2_ranks_Horovod_Gloo-0" / "run_info.json")
                      .read_text())
    assert gloo["world"] == 2  # horovodrun --gloo across the hosts, not two worlds of one
    assert plain["link_theory_ms"] == pytest.approx(plain["sent_bytes_per_rank"] * 8 / 1e8 * 1e3)
    assert s["tcp_tuned"] and "| 100mbit | 2 ranks torch DDP |" in (out / "bench-network.md").read_text()
