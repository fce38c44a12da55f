"""Ranks on more than one host: namespace hosts on this machine (hvdllm.launch.hosts).

Each test makes its own hosts (prefix "hvdt", a random tag each) and removes them, also when it
fails; every launch has its own timeout, and run() kills what a timed-out launch started here,
while the hosts' teardown kills what it started inside them. Needs root, ip, tc and nsenter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import BIN, TINY, env, hvdllm, mpirun, run, train_losses
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
