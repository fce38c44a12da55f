"""A real Slurm cluster for the tests: munged, slurmctld and slurmd, run as root.

One node by default: this machine is both controller and compute node. Given namespace hosts
(hvdllm.launch.hosts), one slurmd runs inside each of them instead, a node named after the
host's hostname at its address, while munged and slurmctld stay in this namespace and listen on
the hosts' bridge: a cluster of several nodes on one machine (docs/slurm.md).

Everything lives in one temporary folder: its own munge key and socket, slurm.conf, state, spool
and logs, on free ports, so it neither needs nor touches a system Slurm or munge. The host is both
controller and compute node; SlurmdParameters=config_overrides lets the node claim more CPUs than
the machine has, so several 2-task jobs fit at once. The daemons run in the foreground as children
of the test process and are stopped by their process ids.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo", "shellcheck")

SLURM_CONF = """\
ClusterName=hvdllmtest
SlurmctldHost={host}({ctld_address})
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
StateSaveLocation={root}/state
# %n: the node's name, so that the slurmds of several nodes on one machine keep apart.
SlurmdSpoolDir={root}/spool/%n
# The PMIx plugin's per-step folders (spmix_appdir_UID_JOB.STEP) go to TmpFS: one per node (two
# nodes' stepds would make the same folder), and in this cluster's folder, not /tmp: every test
# cluster numbers its jobs from 1, and a folder a killed step left behind in /tmp would make the
# same step number of a later cluster fail to launch (srun then exits 0 anyway).
TmpFS={root}/tmp/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
# Look at pending jobs every second (default 60 s): a requeued job starts as soon as it may.
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=10
MinJobAge=600
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def missing_tools() -> list[str]:
    return [tool for tool in DAEMONS + CLIENTS if shutil.which(tool) is None
            and not Path("/usr/sbin", tool).exists()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


NODE = "NodeName={name} NodeAddr={address} CPUs={cpus} RealMemory=1000 State=UNKNOWN"


class SlurmCluster:
    """Start with `start()`, always `stop()` (it is safe to call after a failed start).

    `hosts`: namespace hosts (NamespaceHosts, made by the caller) to be the compute nodes."""

    def __init__(self, root: Path, cpus: int = 16, hosts=None) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus
        self.hosts = hosts
        self.nodes = [(h.name, h.address) for h in hosts] if hosts else [(self.host, "127.0.0.1")]
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self._logs: list = []

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for Slurm commands (and, through sbatch, for the jobs) of this cluster."""
        env = {k: v for k, v in (base or os.environ).items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def start(self, timeout: float = 60) -> None:
        for sub in ("munge", "state", "spool", "log", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o755)  # munged wants its socket directory searchable
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        nodes = "\n".join(NODE.format(name=n, address=a, cpus=self.cpus) for n, a in self.nodes)
        self.conf.write_text(SLURM_CONF.format(
            host=self.host, root=self.root, nodes=nodes, ctld_port=free_port(),
            ctld_address=self.hosts.bridge_address if self.hosts else "127.0.0.1",
            slurmd_port=free_port()))
        m = self.root / "munge"
        self._spawn([_tool("munged"), "-F", "-f", f"--socket={m}/munge.socket", f"--key-file={key}",
                     f"--pid-file={m}/munged.pid", f"--seed-file={m}/seed",
                     f"--log-file={self.root}/log/munged.log"])
        self._wait_for(lambda: (m / "munge.socket").exists(), timeout, "munged socket")
        self._spawn([_tool("slurmctld"), "-D", "-i", "-f", self.conf])
        for i, (name, _) in enumerate(self.nodes):  # the folders of SlurmdSpoolDir and TmpFS
            (self.root / "spool" / name).mkdir()
            (self.root / "tmp" / name).mkdir()
            slurmd = [_tool("slurmd"), "-D", "-N", name, "-f", self.conf]
            self._spawn(self.hosts[i].command(*slurmd) if self.hosts else slurmd, f"slurmd-{name}")
        self._wait_for(self._nodes_idle, timeout, "every node idle in sinfo")

    def _spawn(self, cmd: list, name: str = "") -> None:
        log = open(self.root / "log" / f"{name or Path(str(cmd[0])).name}.stdout", "w")
        self._logs.append(log)
        self.procs.append(subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                                           env=self.env(), start_new_session=True))

    def _nodes_idle(self) -> bool:
        p = subprocess.run(["sinfo", "--Node", "--noheader", "--format=%t"], capture_output=True,
                           text=True, env=self.env(), timeout=10)
        return p.returncode == 0 and p.stdout.split() == ["idle"] * len(self.nodes)

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited while waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")

    def squeue(self) -> str:
        p = subprocess.run(["squeue", "--noheader"], capture_output=True, text=True, env=self.env(),
                           timeout=10)
        return p.stdout.strip()

    def show_job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        p = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True,
                           text=True, env=self.env(), timeout=10)
        return dict(w.split("=", 1) for w in p.stdout.split() if "=" in w)

    def logs(self, tail: int = 30) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel what is left of the jobs, then end the daemons (slurmd first), by process id."""
        if self.procs and self.procs[-1].poll() is None:
            subprocess.run(["scancel", "--user=root"], env=self.env(), capture_output=True, timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.squeue():
                time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        for log in self._logs:
            log.close()
