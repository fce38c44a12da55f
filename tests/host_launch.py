"""Launches inside namespace hosts that a test watches while they run (multihost, elastic)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from conftest import env


def start_in_host(host, cmd: list, log) -> subprocess.Popen:
    """A launch started in `host` in its own session (so the test can end what it started here)."""
    return subprocess.Popen([str(c) for c in host.command(*cmd)], stdout=log,
                            stderr=subprocess.STDOUT, env=env(), start_new_session=True)


def wait_for(condition, timeout_s: float, what: str, log=None) -> None:
    """Poll `condition` until it holds; past `timeout_s` fail, with the launch's log tail."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            tail = Path(log.name).read_text()[-4000:] if log else ""
            raise AssertionError(f"gave up after {timeout_s:.0f} s waiting for {what}\n{tail}")
        time.sleep(0.2)


def logged_steps(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def launch_pids(hosts) -> list[int]:
    """Whatever still runs in the hosts: the launch's ranks, mpirun and its daemons."""
    return [pid for h in hosts for pid in h.pids()]
