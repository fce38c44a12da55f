"""Network namespaces, veth links and their shaping, and what ended sessions left behind: the
low-level half of hvdllm.launch.hosts (which builds hosts from these). Standard library only."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

STATE_DIR = Path("/run/hvdllm-hosts")
"""The creation lock and a folder per instance: state.json and the hosts' UTS namespace files."""
NETNS_DIR = Path("/run/netns")
TOOLS = ("ip", "tc", "nsenter", "unshare", "umount", "sysctl", "hostname")
_RATE_RE = re.compile(r"(\d+(?:\.\d+)?)([a-z]*)")
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12, "kibit": 2**10,
               "mibit": 2**20, "gibit": 2**30, "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}
"""tc's rate units, in bits per second ("bps" is bytes per second in tc)."""
def rate_bits(rate: str | int) -> float:
    """A tc rate ("1gbit", "100mbit", "12.5mbps") or an int of bits per second, in bits/s."""
    if isinstance(rate, int):
        return float(rate)
    m = _RATE_RE.fullmatch(rate.strip().lower())
    if not m or (m.group(2) or "bit") not in _RATE_UNITS:
        raise ValueError(f"not a tc rate: {rate!r} (e.g. 1gbit, 100mbit)")
    return float(m.group(1)) * _RATE_UNITS[m.group(2) or "bit"]


def tbf_burst(bits_per_s: float) -> int:
    """tbf's bucket in bytes: rate/HZ at HZ=1000 (1 ms of traffic), at least 16 KiB.

    tc-tbf asks for at least rate/HZ, so that the bucket refills between timer ticks. tbf waits
    on high-resolution timers now, so the shortest usual tick (1 ms) is enough, and it keeps
    bursts short: 125 kB at 1 Gbit/s, well below the tiny job's 0.55 MB of gradients, so the rate
    shows in its step time. The floor keeps the bucket above ten 1514-byte frames (a frame larger
    than the bucket is dropped; tbf splits larger GSO packets) and wakeups at low rates few."""
    return max(int(bits_per_s / 8 / 1000), 16 * 1024)


def shaping(tc: list[str], dev: str, rate: str | int | None, delay_ms: float | None
            ) -> list[list[str]]:
    """The tc commands modelling one link end: netem delay as root, tbf rate under it."""
    cmds, parent = [], ["root"]
    if delay_ms:  # 10000 packets: netem's default 1000 drops at veth speed (>8 Gbit/s) x 1 ms
        cmds.append([*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem",
                     "delay", f"{delay_ms}ms", "limit", "10000"])
        parent = ["parent", "1:1"]
    if rate:
        bits = rate_bits(rate)
        cmds.append([*tc, "qdisc", "add", "dev", dev, *parent, "handle", "10:", "tbf",
                     "rate", f"{int(bits)}bit", "burst", str(tbf_burst(bits)), "latency", "50ms"])
    return cmds
def missing_tools() -> list[str]:
    """The tools needed that are not on PATH (root's PATH has the sbin folders)."""
    return [t for t in TOOLS if shutil.which(t) is None]


def unusable_reason() -> str:
    """Why namespace hosts cannot be made here, "" if they can (a test's skip reason)."""
    if os.geteuid() != 0:
        return "namespace hosts need root"
    missing = missing_tools()
    if missing:
        return f"namespace hosts need {', '.join(missing)} (not found)"
    # Root in a container may still lack the capability: try one throw-away network namespace.
    probe = run_cmd(["unshare", "--net", "true"], check=False)
    if probe.returncode:
        why = probe.stderr.strip() or "unshare --net failed"
        return f"cannot make network namespaces here: {why}"
    return ""


def cleanup_leftovers(prefix: str = "hvd", force: bool = False) -> list[str]:
    """Remove the instances named from `prefix` whose owner has ended (all of them with `force`),
    and namespaces and links named like theirs with no live state: their tags."""
    tag_re = rf"{re.escape(prefix)}[0-9a-f]{{4}}"
    with locked():
        live, stale = set(), {}
        for d in STATE_DIR.iterdir():
            if re.fullmatch(tag_re, d.name):
                state = read_state(d)
                if not force and state and start_time(state["owner"]) == state["owner_start"]:
                    live.add(d.name)
                else:
                    stale[d.name] = d
        for name in netns_names() + link_names():
            m = re.match(rf"({tag_re})(-|br$|h\d+$)", name)
            if m and m.group(1) not in live:
                stale.setdefault(m.group(1), STATE_DIR / m.group(1))
        for tag, d in stale.items():
            remove_instance(f"{tag}br", [n for n in netns_names() if n.startswith(f"{tag}-")],
                    [n for n in link_names() if re.fullmatch(rf"{tag}h\d+", n)], d)
    return sorted(stale)


def run_cmd(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    if check and p.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")
    return p


def netns_names() -> list[str]:
    return sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []


def link_names() -> list[str]:
    return sorted(p.name for p in Path("/sys/class/net").iterdir())


def remove_instance(bridge: str, netns: list[str], links: list[str], state_dir: Path) -> None:
    """Processes first, then veths (deleting one end deletes both, at once, whereas a deleted
    namespace's devices go lazily), namespaces, bridge, UTS bind mounts, state folder."""
    for ns in netns:
        kill_all(ns)
    for cmd in ([["ip", "link", "delete", link] for link in links]
                + [["ip", "netns", "delete", ns] for ns in netns]
                + [["ip", "link", "delete", bridge]]
                + [["umount", str(uts)] for uts in state_dir.glob("*.uts")]):
        run_cmd(cmd, check=False)  # each may be gone already
    shutil.rmtree(state_dir, ignore_errors=True)


def kill_all(netns: str, timeout: float = 10.0) -> None:
    """SIGKILL every process in `netns` until none is left (one may fork while it is killed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [int(p) for p in run_cmd(["ip", "netns", "pids", netns], check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    print(f"warning: processes still in {netns} after {timeout} s", file=sys.stderr)


@contextmanager
def locked() -> Iterator[None]:
    """Serialise subnet choice and leftover cleanup between processes on this machine."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def free_base(network: str | None) -> str:
    """`network`'s 127.x.y, or the first 127.77.N that neither an address here nor another
    instance's state file (its bridge may not be up yet) uses."""
    if network:
        if not (m := re.fullmatch(r"(127\.\d+\.\d+)\.0/24", network)):
            raise ValueError(f"network {network!r}: a 127.x.y.0/24")
        return m.group(1)
    used = run_cmd(["ip", "-4", "-o", "addr", "show"]).stdout + "".join(
        f" {s['network']}" for d in STATE_DIR.iterdir() if (s := read_state(d)))
    for n in range(256):
        if f" 127.77.{n}." not in used:
            return f"127.77.{n}"
    raise RuntimeError("no free 127.77.N.0/24 left")


def start_time(pid: int) -> int | None:
    """A process's start time (clock ticks after boot): with its id, it names it despite reuse."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def read_state(d: Path) -> dict | None:
    try:
        return json.loads((d / "state.json").read_text())
    except (OSError, ValueError):
        return None
