"""The OpenMPI environment for launching ranks on one machine, defined once.

Used by the Makefile (`make demo`), the tests (tests/conftest.py) and `hvdllm bench`. Each
setting is the environment form of an `mpirun` flag (docs/launching.md):

- run as root (`--allow-run-as-root`): containers and CI machines are often root;
- more ranks than cores (`--oversubscribe`): 4 ranks on a 2-core machine;
- no binding (`--bind-to none`): otherwise each rank's torch threads share one core;
- yield when idle (`--mca mpi_yield_when_idle 1`): on CPU a waiting rank's progress engine would
  otherwise spin on the core the other rank needs for compute (~30 % slower with 2 ranks).
- keepalive on mpirun's control connections (`--mca oob_tcp_keepalive_*`, set here in the
  environment, which mpirun also hands its daemons: the command-line form did not end a launch
  in the cut-link test): an idle connection is probed every second after 2 s idle and a daemon
  that misses 3 probes is dropped, so a lost host ends the launch within about 5 s with OpenMPI's
  message naming it. It must notice before any rank's abort queues a message to the lost host:
  keepalives stop while data is unacknowledged, and mpirun then waits for TCP's retransmission
  timeout (seen in the test with 5 s / 2 s / 3 probes against a 10 s peer timeout).
  With the defaults (300 s idle, then 9 x 20 s) mpirun and the far host's daemon wait on each
  other for minutes after a cut link, while no rank is left (tests/test_multihost.py). Harmless
  on one machine, where there are no remote daemons.

`python -m hvdllm.launch.env` prints them as NAME=value lines, for `env $(...) mpirun ...`.
Standard library only: the Makefile runs it before anything else is imported.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping

LOCAL_MPI_ENV: dict[str, str] = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMPI_MCA_hwloc_base_binding_policy": "none",
    "OMPI_MCA_mpi_yield_when_idle": "1",
    "OMPI_MCA_oob_tcp_keepalive_time": "2",
    "OMPI_MCA_oob_tcp_keepalive_intvl": "1",
    "OMPI_MCA_oob_tcp_keepalive_probes": "3",
}
"""OpenMPI settings for every local launch: root allowed, oversubscription, no binding, yield,
a lost daemon noticed within seconds."""


def mpi_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """`base` (default: this process's environment) with the local MPI settings and `extra` on top."""
    return {**(os.environ if base is None else base), **LOCAL_MPI_ENV, **extra}


def env_lines(settings: Mapping[str, str] = LOCAL_MPI_ENV) -> str:
    """The settings as NAME=value lines (values here have no spaces or quotes)."""
    return "".join(f"{name}={value}\n" for name, value in settings.items())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (a fixed one can linger in TIME_WAIT between launches)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def main(argv: list[str]) -> int:
    """Print the settings, one NAME=value a line; no arguments are accepted."""
    if argv:
        print("usage: python -m hvdllm.launch.env  (prints NAME=value lines)", file=sys.stderr)
        return 2
    sys.stdout.write(env_lines())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
