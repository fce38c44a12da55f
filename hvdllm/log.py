"""One logger for hvdllm, filtered by rank: rank 0 logs everything, other ranks only warnings."""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("hvdllm")


def world_rank() -> int:
    """This process's rank as the launcher tells it (mpirun, srun, horovodrun), before MPI is up."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "HOROVOD_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(rank: int | None = None, level: int = logging.INFO) -> None:
    """Send hvdllm's log to stderr; call again with the real rank once MPI is initialised."""
    rank = world_rank() if rank is None else rank
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(rank))
    handler.setFormatter(logging.Formatter("[%(asctime)s rank %(rank)d] %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
