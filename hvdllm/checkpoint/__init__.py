"""Checkpoints: one manager owns the files (manager.py); shards carry checksums (shards.py)."""

from hvdllm.checkpoint.manager import Checkpoint, CheckpointManager, resume_candidates
from hvdllm.checkpoint.shards import CheckpointError
from hvdllm.checkpoint.state import (
    load_named_optimizer_state,
    named_optimizer_state,
    select_state,
    tied_aliases,
)

__all__ = ["Checkpoint", "CheckpointError", "CheckpointManager", "load_named_optimizer_state",
           "named_optimizer_state", "resume_candidates", "select_state", "tied_aliases"]
