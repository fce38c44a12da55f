"""Checkpoint shards: files of tensors, each written with its SHA-256 and read back verified.

A shard is one `torch.save` file: a stage's model tensors, a stage's optimizer state (keyed by
parameter name), or the run's counters. Its entry in meta.json records its size, checksum and
the parameter names it holds, so a rank reads only the shards holding its names, and a damaged
or truncated file is recognised before anything of it is used. Reading is `torch.load(...,
weights_only=True)`: tensors and plain containers only; a pickle holding anything else is
refused, never run.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from hvdllm.errors import UserError

TRAIN_SHARD = "train.pt"


class CheckpointError(UserError):
    """A checkpoint (or one of its files) that cannot be used; the message names it and why."""


def shard_name(kind: str, stage: int, replica: int | None = None) -> str:
    """File name of a stage's shard of one kind ("model", "optim"); ZeRO-1's optimizer state
    has one shard per replica of the stage."""
    return f"{kind}_stage{stage}.pt" if replica is None else f"{kind}_stage{stage}_replica{replica}.pt"


def shard_kind(name: str) -> str:
    return name.split("_stage", 1)[0] if "_stage" in name else name.removesuffix(".pt")


class _HashingWriter:
    """A file that hashes and counts what is written through it: torch.save streams into the
    shard's file, so no copy of the shard is held in memory (a BytesIO and its getvalue() held
    two, i.e. twice the optimizer state, at every checkpoint)."""

    def __init__(self, file) -> None:
        self.file, self.sha256, self.bytes = file, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def write_shard(directory: Path, name: str, obj: Any) -> dict:
    """Save obj as directory/name; returns its meta entry (bytes, sha256, names held)."""
    with open(directory / name, "wb") as f:
        out = _HashingWriter(f)
        torch.save(obj, out)
    names = sorted(obj) if isinstance(obj, dict) and name != TRAIN_SHARD else []
    return {"bytes": out.bytes, "sha256": out.sha256.hexdigest(), "names": names}


def read_shard(ckpt: Path, name: str, entry: dict | None) -> Any:
    """Load a shard, verified against its meta entry (None: an older checkpoint, unverified)."""
    path = ckpt / name
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e})") from None
    if entry is not None:
        if len(data) != entry["bytes"]:
            raise CheckpointError(f"{path} has {len(data)} bytes, its checkpoint recorded "
                                  f"{entry['bytes']} (cut short or replaced)")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{path} fails its checksum (damaged or replaced)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported object"
        raise CheckpointError(f"{path} holds more than plain tensors and is refused "
                              f"(weights_only load: {first[:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable torch file ({str(e)[:200]})") from None
