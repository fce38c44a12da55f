"""Test hosts on one machine: N Linux network namespaces on one bridge, to try a cluster launch.

    from hvdllm.launch.hosts import namespace_hosts
    with namespace_hosts(2, rate="1gbit") as hosts:                   # as root
        agent = hosts.write_agent(tmp_dir)
        subprocess.run(hosts[0].command("mpirun", *hosts.mpirun_args(agent), "hostname"))

or from a shell (CMD runs in host 1, with HVDLLM_NS_MPIRUN_ARGS set; the hosts go when it ends):

    python -m hvdllm.launch.hosts run -n 2 --rate 1gbit -- \\
        sh -c 'mpirun $HVDLLM_NS_MPIRUN_ARGS hostname'
    python -m hvdllm.launch.hosts cleanup          # what killed sessions left behind

Each host is a network namespace (`lo`; `eth0`, 127.77.N.i/24) and a UTS namespace (hostname
hvdhost1, ...); each eth0 is a veth whose other end is a port of a bridge in the caller's ("root")
namespace, 127.77.N.254/24: a star of hosts on one switch, one interface name in all (horovodrun).

Why so:
- 127/8 addresses: tests may only send traffic there or to namespaces they made. They route on a
  non-loopback device only with route_localnet=1: set in each host (all, eth0) and on the bridge
  device alone, which leaves the machine's own setting as it is.
- A /24 and a random tag per instance (namespace hvd3fa1-hvdhost1, bridge hvd3fa1br; a second,
  concurrent instance on 127.77.1.0/24), claimed under a lock: two sessions, or one and a
  leftover, share no name and no route. The state file, written before anything is made, names
  the owner process: cleanup_leftovers() removes only what an ended owner left.
- Links (optional): tc shapes egress only, so both ends of each veth get the same qdiscs. `rate`
  is tbf (burst: tbf_burst()); `delay_ms`, netem per link and direction (host to host, two
  links: 2 x delay_ms one way), is the root with tbf under it. Kernels without sch_netem (the
  one this was written on) refuse `delay_ms`.
- nsenter (--net, --uts) enters a host, not `ip netns exec`: that remounts /sys in a new mount
  namespace (slurmd then misses /sys/fs/cgroup) and bind-mounts /etc/netns/NS files.
- Teardown kills each namespace's processes first (`ip netns pids`): `ip netns delete` does not.
- The hostnames do not resolve to the hosts' addresses (no /etc/hosts): mpirun is given
  addresses; Horovod's Gloo process-set context falls back to the hostname (127.0.0.1 here).
- Launch with hvdllm.launch.env's settings (oversubscribe, no binding, yield): all hosts share
  this machine's cores.
- `sysctls` are set in every host (net.* settings are per namespace): the kernel's defaults
  otherwise, as on an untuned node; the machine's own settings are never touched.

Needs root, iproute2 (ip, tc), util-linux (nsenter, unshare, umount), sysctl, hostname.
Standard library only, like all of hvdllm.launch.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import secrets
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from hvdllm.launch.env import mpi_env
from hvdllm.launch.netns import (NETNS_DIR, STATE_DIR, cleanup_leftovers, free_base, link_names,
                                 locked, netns_names, rate_bits, remove_instance,
                                 run_cmd, shaping, start_time, unusable_reason)

FORWARD_ENV = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "VIRTUAL_ENV", "HOME")
"""Given to the ranks with -x when set (as is every OMPI_* name): what a remote host lacks."""
_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,5}")
AGENT = """\
#!/bin/sh
# ssh for the namespace hosts {tag} (hvdllm.launch.hosts): OpenMPI's rsh agent, and `ssh`
# for horovodrun. AGENT [OPTIONS] HOST [OPTIONS] WORD...: the words are one command line for
# HOST's login shell, run inside HOST's namespaces.
[ -n "$HVDLLM_NS_RSH_LOG" ] && printf '<%s> ' "$@" >> "$HVDLLM_NS_RSH_LOG" \\
  && echo >> "$HVDLLM_NS_RSH_LOG"
net=
while [ $# -gt 0 ] && [ -z "$net" ]; do
  case "$1" in
{cases}    -[bcDEeFIiJLlmOopQRSWw]) shift ;;  # an ssh option with a value
    -*) ;;
    *) echo "$0: not one of these hosts: $1" >&2; exit 255 ;;
  esac
  shift
done
[ -n "$net" ] || {{ echo "$0: no host given" >&2; exit 255; }}
while [ $# -gt 0 ]; do  # ssh options after the host too (horovodrun: HOST -o ConnectTimeout=N)
  case "$1" in
    -[bcDEeFIiJLlmOopQRSWw]) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
IFS=' '
exec nsenter --net="$net" --uts="$uts" -- {shell} -c "$*"
"""
"""The agent's script: {cases} maps each host's address and name to its namespace files."""


@dataclass(frozen=True)
class Host:
    """One namespace host; `peer` is the root-side end of its veth (a port of the bridge)."""

    index: int
    name: str
    netns: str
    address: str
    ifname: str
    peer: str
    uts: Path

    def command(self, *argv: str | os.PathLike) -> list[str]:
        """`argv` run inside this host: its network and UTS namespaces; same files, same env."""
        return ["nsenter", f"--net={NETNS_DIR / self.netns}", f"--uts={self.uts}", "--",
                *map(str, argv)]

    def pids(self) -> list[int]:
        """The processes in this host's network namespace (what teardown kills)."""
        out = run_cmd(["ip", "netns", "pids", self.netns], check=False).stdout
        return [int(p) for p in out.split()]


class NamespaceHosts:
    """N hosts on a bridge: made on entering, removed on leaving (also when the body raised).

    A sequence of Host; `network` (127.77.N.0/24), `bridge`, `bridge_address`, `tag`."""

    def __init__(self, n: int, rate: str | int | None = None, delay_ms: float | None = None,
                 prefix: str = "hvd", hostname: str = "hvdhost", network: str | None = None,
                 sysctls: Mapping[str, str] | None = None) -> None:
        if not 1 <= n <= 253:
            raise ValueError(f"1 to 253 hosts, not {n}")
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError(f"prefix {prefix!r}: a lowercase letter, then up to 5 letters/digits")
        if rate is not None:
            rate_bits(rate)
        self.n, self.rate, self.delay_ms, self.hostname = n, rate, delay_ms, hostname
        self.prefix, self._network = prefix, network
        self.sysctls = dict(sysctls or {})  # set in every host, e.g. TCP tuning (per namespace)
        self.tag = self.bridge = self._base = ""  # chosen by create(), under the lock
        self.dir: Path | None = None  # set once this instance owns its state folder
        self.hosts: list[Host] = []

    def __len__(self) -> int:
        return len(self.hosts)

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    @property
    def network(self) -> str:
        """The hosts' subnet, e.g. "127.77.0.0/24" (for btl_tcp_if_include and the like)."""
        if not self._base:
            raise RuntimeError("the hosts are not made yet")
        return f"{self._base}.0/24"

    @property
    def bridge_address(self) -> str:
        return f"{self._base}.254"

    def __enter__(self) -> NamespaceHosts:
        try:
            self.create()
        except BaseException:
            self.destroy(strict=False)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.destroy(strict=exc_type is None)

    def create(self) -> None:
        """Claim a tag and a subnet and write the state file (under the lock), then build."""
        if problem := unusable_reason():
            raise RuntimeError(problem)
        with locked():
            taken = {d.name for d in STATE_DIR.iterdir()} | {*netns_names(), *link_names()}
            while not self.tag or any(t.startswith(self.tag) for t in taken):
                self.tag = self.prefix + secrets.token_hex(2)
            self.bridge, self._base = f"{self.tag}br", free_base(self._network)
            self.hosts = [self._host(i) for i in range(1, self.n + 1)]
            (STATE_DIR / self.tag).mkdir()
            self.dir = STATE_DIR / self.tag
            state = {"owner": os.getpid(), "owner_start": start_time(os.getpid()),
                     "network": self.network}
            (self.dir / "state.json").write_text(json.dumps(state))
        run_cmd(["ip", "link", "add", self.bridge, "type", "bridge"])
        Path(f"/proc/sys/net/ipv4/conf/{self.bridge}/route_localnet").write_text("1")
        run_cmd(["ip", "addr", "add", f"{self.bridge_address}/24", "dev", self.bridge])
        run_cmd(["ip", "link", "set", self.bridge, "up"])
        for host in self.hosts:
            self._create_host(host)

    def _host(self, i: int) -> Host:
        name = f"{self.hostname}{i}"
        return Host(index=i, name=name, netns=f"{self.tag}-{name}", address=f"{self._base}.{i}",
                    ifname="eth0", peer=f"{self.tag}h{i}",
                    uts=STATE_DIR / self.tag / f"{name}.uts")

    def _create_host(self, h: Host) -> None:
        """Namespace; veth pair, its inner end made inside as eth0; addresses, sysctls, tc."""
        ipn = ["ip", "-n", h.netns]
        run_cmd(["ip", "netns", "add", h.netns])
        run_cmd(["ip", "link", "add", h.peer, "type", "veth", "peer", "name", h.ifname,
              "netns", h.netns])
        run_cmd(["ip", "link", "set", h.peer, "master", self.bridge, "up"])
        run_cmd([*ipn, "link", "set", "lo", "up"])
        run_cmd(["nsenter", f"--net={NETNS_DIR / h.netns}", "sysctl", "-q", "-w",
              "net.ipv4.conf.all.route_localnet=1", f"net.ipv4.conf.{h.ifname}.route_localnet=1",
              *(f"{k}={v}" for k, v in self.sysctls.items())])
        run_cmd([*ipn, "addr", "add", f"{h.address}/24", "dev", h.ifname])
        run_cmd([*ipn, "link", "set", h.ifname, "up"])
        h.uts.touch()
        run_cmd(["unshare", f"--uts={h.uts}", "hostname", h.name])  # bind-mounted there: persists
        for cmd in (shaping(["tc", "-n", h.netns], h.ifname, self.rate, self.delay_ms)
                    + shaping(["tc"], h.peer, self.rate, self.delay_ms)):
            try:
                run_cmd(cmd)
            except RuntimeError as e:
                if "kind is unknown" not in str(e):
                    raise
                kind = cmd[cmd.index("handle") + 2]
                what = "delay_ms" if kind == "netem" else "rate"
                raise RuntimeError(f"this kernel has no {kind} qdisc (sch_{kind}): no {what}"
                                   ) from e

    def destroy(self, strict: bool = True) -> None:
        """Kill the hosts' processes; delete veths, namespaces, bridge, UTS files, state.

        `strict`: raise if anything is left; else (leaving after an error) only warn, so that the
        body's own exception is the one reported."""
        if self.dir is None:  # nothing was made (and the tag may be someone else's)
            return
        remove_instance(self.bridge, [h.netns for h in self.hosts], [h.peer for h in self.hosts],
                self.dir)
        if left := self.leftovers():
            message = f"namespace hosts {self.tag}: still there after teardown: {left}"
            if strict:
                raise RuntimeError(message)
            print(f"warning: {message}", file=sys.stderr)

    def leftovers(self) -> list[str]:
        """What of this instance exists now: namespaces, links, state folder (all after create)."""
        netns, links = set(netns_names()), set(link_names())
        return ([h.netns for h in self.hosts if h.netns in netns]
                + [n for n in (self.bridge, *(h.peer for h in self.hosts)) if n and n in links]
                + ([str(self.dir)] if self.dir and self.dir.exists() else []))

    def write_ssh(self, directory: str | os.PathLike) -> Path:
        """Write the agent as `directory`/ssh, for launchers that call ssh by name (horovodrun):
        put `directory` first on PATH. Returns `directory`."""
        os.makedirs(directory, exist_ok=True)
        self.write_agent(directory, name="ssh")
        return Path(directory)

    def write_agent(self, directory: str | os.PathLike, name: str = "") -> Path:
        """Write OpenMPI's rsh agent (plm_rsh_agent) for these hosts into `directory`: its path.

        OpenMPI calls it as it would ssh, `AGENT HOST WORD...` (ssh options before HOST are
        skipped): the words are orted's command line, quoted for a shell, that ssh would join
        with spaces for the login shell. The agent runs `LOGIN_SHELL -c "WORD ..."` inside HOST
        (its address or its name). HVDLLM_NS_RSH_LOG=FILE logs each call's arguments as <...>."""
        shell = pwd.getpwuid(os.getuid()).pw_shell
        if not shell or "nologin" in shell or not os.access(shell, os.X_OK):
            shell = "/bin/sh"
        q = shlex.quote
        cases = "".join(f"    {q(h.address)}|{q(h.name)}) net={q(str(NETNS_DIR / h.netns))} "
                        f"uts={q(str(h.uts))} ;;\n" for h in self.hosts)
        path = Path(directory) / (name or f"ns-rsh-{self.tag}")
        path.write_text(AGENT.format(tag=self.tag, cases=cases, shell=q(shell)))
        path.chmod(0o755)
        return path

    def mpirun_args(self, agent: str | os.PathLike, slots: int = 1,
                    env: Mapping[str, str] | None = None) -> list[str]:
        """mpirun's arguments: `slots` ranks per host, started through `agent`, TCP on `network`.

        -x forwards FORWARD_ENV and the OMPI_* names set in `env`, the environment mpirun will
        have (default: this process's); the agent's children inherit it anyway, a real remote
        host would not. plm rsh: not Slurm's launcher even inside an allocation. No tree spawn:
        mpirun starts every orted itself, not orteds from inside other hosts. Launch mpirun
        with hvdllm.launch.env's settings: their keepalive makes a lost host end the launch."""
        env = os.environ if env is None else env
        names = [n for n in FORWARD_ENV if n in env]
        names += sorted(n for n in env if n.startswith("OMPI_"))
        mca = {"plm": "rsh", "plm_rsh_agent": str(agent), "plm_rsh_no_tree_spawn": "1",
               "btl": "tcp,self", "btl_tcp_if_include": self.network,
               "oob_tcp_if_include": self.network}
        return ["-np", str(slots * len(self.hosts)),
                "-H", ",".join(f"{h.address}:{slots}" for h in self.hosts),
                *[a for k, v in mca.items() for a in ("--mca", k, v)],
                *[a for n in names for a in ("-x", n)]]


def namespace_hosts(n: int, rate: str | int | None = None, delay_ms: float | None = None,
                    prefix: str = "hvd", **kw) -> NamespaceHosts:
    """`with namespace_hosts(2, rate="1gbit") as hosts: ...` (NamespaceHosts for the rest)."""
    return NamespaceHosts(n, rate=rate, delay_ms=delay_ms, prefix=prefix, **kw)


def main(argv: list[str]) -> int:
    """`run [-n N] [--rate R] [--delay-ms D] [--slots S] -- CMD...` or `cleanup [--prefix P]`."""
    parser = argparse.ArgumentParser(prog="python -m hvdllm.launch.hosts")
    sub = parser.add_subparsers(dest="what", required=True)
    run = sub.add_parser("run", help="make hosts, run CMD in host 1, remove the hosts")
    run.add_argument("-n", type=int, default=2)
    run.add_argument("--rate")
    run.add_argument("--delay-ms", type=float)
    run.add_argument("--slots", type=int, default=1)
    run.add_argument("cmd", nargs="+")
    clean = sub.add_parser("cleanup", help="remove what ended sessions left behind")
    clean.add_argument("--prefix", default="hvd")
    clean.add_argument("--force", action="store_true", help="also instances whose owner lives")
    args = parser.parse_args(argv)
    if args.what == "cleanup":
        print("\n".join(cleanup_leftovers(args.prefix, args.force)) or "nothing left behind")
        return 0
    try:
        with namespace_hosts(args.n, rate=args.rate, delay_ms=args.delay_ms) as hosts:
            agent = hosts.write_agent(hosts.dir)
            env = mpi_env()
            env["HVDLLM_NS_MPIRUN_ARGS"] = shlex.join(hosts.mpirun_args(agent, args.slots, env))
            return subprocess.run(hosts[0].command(*args.cmd), env=env).returncode
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
