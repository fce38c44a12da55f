"""Tokenizing one work unit into token shards (what a worker process runs).

A unit's documents stream through: each is put on its side of the train/val split (by the hash
of its name), encoded in batches of about `BATCH_BYTES` of text, followed by the end-of-text
token, and appended to that side's buffer; a buffer of at least `shard_tokens` tokens is written
out as one shard. Shard `SPLIT/UUUUU-PPPP.bin` is part P of unit U: the names and contents depend
only on the unit, so any number of workers or ranks writes the same files. Each shard is written
to a temporary name and renamed; the unit's record `units/UUUUU.json`, written last (also
atomically), marks the unit finished, which is what an interrupted `prepare` keeps.

This module imports no torch and no transformers, so worker processes start quickly.
"""

from __future__ import annotations

import json
import os
import signal
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from hvdllm.data.formats import Record, bad_record, read_records

SPLITS = ("train", "val")
BATCH_BYTES = 1 << 20
"""Text encoded per call to the tokenizer (bounds a worker's memory with the shard buffer)."""
KILL_AFTER_SHARD = "HVDLLM_PREPARE_KILL_AFTER_SHARD"
"""Tests only: a process that has written this many shards kills itself (SIGKILL)."""


def is_val(name: str, seed: int, fraction: float) -> bool:
    """Deterministic split by document name: the same document always lands on the same side."""
    return (zlib.crc32(f"{seed}:{name}".encode()) % 1_000_000) < fraction * 1_000_000


@dataclass(frozen=True)
class UnitTask:
    """Everything a worker needs to tokenize one unit (picklable)."""
    index: int
    files: tuple[str, ...]
    names: tuple[str, ...]
    out: str
    dtype: str
    eos: int
    seed: int
    val_fraction: float
    text_field: str
    skip_bad: bool
    shard_tokens: int


@dataclass
class UnitResult:
    """What a finished unit wrote: per split, its shards as [file, tokens, documents]."""
    index: int
    shards: dict[str, list[list]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    text_bytes: int = 0
    skipped: int = 0
    first_problem: str = ""


def unit_record(out: Path, index: int) -> Path:
    return out / "units" / f"{index:05d}.json"


def write_atomic(path: Path, data: bytes) -> None:
    """Write to PATH.tmp, then rename: a reader sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


_written = 0


def _count_shard() -> None:
    """The test hook: die hard once this process has written KILL_AFTER_SHARD shards."""
    global _written
    _written += 1
    if os.environ.get(KILL_AFTER_SHARD) == str(_written):
        os.kill(os.getpid(), signal.SIGKILL)


class SplitWriter:
    """One side's buffer: tokens accumulate until a shard's worth, then go to disk."""

    def __init__(self, task: UnitTask, split: str, result: UnitResult) -> None:
        self.task, self.split, self.result = task, split, result
        self.parts: list[np.ndarray] = []
        self.tokens = self.documents = 0

    def add(self, ids: list[list[int]]) -> None:
        """Append documents (each followed by end-of-text); write a shard each time the buffer
        reaches shard_tokens at a document's end, so shards hold whole documents."""
        eos, tokens = self.task.eos, []
        for doc in ids:
            tokens += doc
            tokens.append(eos)
        flat = np.array(tokens, dtype=self.task.dtype)
        ends = np.cumsum([len(doc) + 1 for doc in ids])
        start = done = 0  # tokens and documents of this batch already in the buffer
        while True:
            k = int(np.searchsorted(ends, start + self.task.shard_tokens - self.tokens))
            if k == len(ends):
                break
            self._take(flat[start:ends[k]], k + 1 - done)
            self.flush()
            start, done = int(ends[k]), k + 1
        self._take(flat[start:], len(ids) - done)

    def _take(self, tokens: np.ndarray, documents: int) -> None:
        if tokens.size:
            self.parts.append(tokens)
            self.tokens += tokens.size
            self.documents += documents

    def flush(self) -> None:
        if not self.tokens:
            return
        shards = self.result.shards[self.split]
        name = f"{self.split}/{self.task.index:05d}-{len(shards):04d}.bin"
        write_atomic(Path(self.task.out) / name, np.concatenate(self.parts).tobytes())
        shards.append([name, self.tokens, self.documents])
        self.parts, self.tokens, self.documents = [], 0, 0
        _count_shard()


_tokenizers: dict[str, object] = {}


def _tokenizer(out: str):
    """The prepared tokenizer (tokenizer/tokenizer.json), loaded once per process."""
    if out not in _tokenizers:
        from tokenizers import Tokenizer

        _tokenizers[out] = Tokenizer.from_file(str(Path(out) / "tokenizer" / "tokenizer.json"))
    return _tokenizers[out]


def _bad(task: UnitTask, path: str, rec: Record, result: UnitResult) -> None:
    where = bad_record(path, rec, task.skip_bad)  # raises unless skipping
    result.skipped += 1
    result.first_problem = result.first_problem or where


def encode_unit(task: UnitTask, progress: Callable[[int], None] = lambda n: None) -> UnitResult:
    """Tokenize one unit into its shards and write its record; returns what it wrote.
    `progress(n)` is told every n bytes of input read."""
    tok = _tokenizer(task.out)
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)  # same ids, no offsets
    result = UnitResult(task.index)
    writers = {s: SplitWriter(task, s, result) for s in SPLITS}
    batch: dict[str, list[str]] = {s: [] for s in SPLITS}
    pending = 0

    def encode(split: str) -> None:
        if batch[split]:
            writers[split].add([e.ids for e in encode_batch(batch[split])])
            batch[split] = []

    for path, name in zip(task.files, task.names):
        done = 0
        for rec in read_records(Path(path), name, task.text_field):
            progress(rec.pos - done)
            done = rec.pos
            if rec.text is None:
                _bad(task, path, rec, result)
                continue
            split = "val" if is_val(rec.name, task.seed, task.val_fraction) else "train"
            batch[split].append(rec.text)
            pending += len(rec.text)
            result.text_bytes += len(rec.text.encode("utf-8", errors="replace"))
            if pending >= BATCH_BYTES:
                encode("train"), encode("val")
                pending = 0
        progress(Path(path).stat().st_size - done)
    for split in SPLITS:
        encode(split)
        writers[split].flush()
    write_atomic(unit_record(Path(task.out), task.index), json.dumps(asdict(result)).encode())
    return result


def load_unit(out: Path, index: int) -> UnitResult | None:
    """A finished unit's record from an earlier (interrupted) run, or None."""
    path = unit_record(out, index)
    if not path.is_file():
        return None
    return UnitResult(**json.loads(path.read_text()))
