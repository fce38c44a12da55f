"""The prepared directory's index, meta.json (format 3), and opening prepared data.

    DATA_DIR/
      meta.json            the index, written last (atomically): a directory without it is unfinished
      tokenizer/           a Hugging Face tokenizer (tokenizer.json + config)
      train/UUUUU-PPPP.bin token shards (uint16, or uint32 for vocabularies over 65,536), documents
      val/UUUUU-PPPP.bin     separated by the end-of-text token; part P of work unit U
      progress.json        only while unfinished: the key the finished units/ belong to
      units/UUUUU.json     only while unfinished: the shards of each finished unit

meta.json holds: `format`; `key` (format, settings, layout and inputs hashed together: what
`prepare` compares); `settings`, the job values that shape the tokens (checked by `train` from
the job alone, so training needs only this directory); `layout`, how the tokens are cut into
shards (no effect on training); `inputs`, a fingerprint of what `prepare` read; the tokenizer's
fingerprint, vocabulary size, end-of-text id and dtype; and per split the documents, tokens and
the ordered list of shards `[file, tokens, documents]`. It has no times or rank counts, so
every layout of `prepare` (one process, workers, ranks, a resumed run) writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hvdllm.config import JobConfig
from hvdllm.errors import UserError

FORMAT_VERSION = 3
"""3: token shards listed in meta.json (2: one train.bin and one val.bin)."""
FIX = "run: hvdllm prepare JOB.toml"


def job_settings(job: JobConfig) -> dict:
    """The job's values that shape the tokens, read from the job alone (no file is opened).

    `hvdllm train` compares these with meta.json's, so a node that holds only the prepared
    directory can train. data.seq_len is not among them: windows are cut when training reads.
    """
    d = job.data
    bpe = d.tokenizer == "bpe"
    return {"data.source": d.source, "data.tokenizer": d.tokenizer,
            "data.vocab_size": d.vocab_size if bpe else 0,
            "data.tokenizer_sample_bytes": d.tokenizer_sample_bytes if bpe else 0,
            "data.text_field": d.text_field, "data.on_bad_record": d.on_bad_record,
            "data.val_fraction": d.val_fraction, "run.seed": job.run.seed}


def job_layout(job: JobConfig) -> dict:
    """How tokens are cut into shards: part of the key, not checked by `train`."""
    return {"data.shard_bytes": job.data.shard_bytes}


def prepare_key(settings: dict, layout: dict, inputs: str) -> str:
    """The whole key `prepare` compares: format, settings, layout and inputs."""
    blob = json.dumps([FORMAT_VERSION, settings, layout, inputs], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


class ShardedTokens:
    """A split's shards, in index order, read as one sequence: `size`, `len`, and `tokens[i]`
    for an integer array (any shape) or a slice, like the numpy array it stands for."""

    def __init__(self, paths: list[Path], dtype: str) -> None:
        self.dtype = np.dtype(dtype)
        maps = [np.memmap(p, dtype=self.dtype, mode="r") for p in paths if p.stat().st_size]
        self.shards = maps
        self.starts = np.cumsum([0] + [m.size for m in maps])
        self.size = int(self.starts[-1])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: np.ndarray | slice | int) -> np.ndarray:
        if isinstance(index, slice):
            return self[np.arange(self.size)[index]]
        flat = np.asarray(index, dtype=np.int64).ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= self.size):
            raise IndexError(f"token index outside 0..{self.size - 1}")
        shard = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self.shards[s][flat[mask] - self.starts[s]]
        return out.reshape(np.shape(index))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate(self.shards) if self.shards else np.zeros(0, self.dtype)
        return whole if dtype is None else whole.astype(dtype)


@dataclass
class PreparedData:
    dir: Path
    meta: dict

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / "tokenizer"

    def shard_paths(self, split: str) -> list[Path]:
        return [self.dir / name for name, _, _ in self.meta[split]["shards"]]

    def tokens(self, split: str) -> ShardedTokens:
        """The split's tokens: its shards memory-mapped, read as one sequence."""
        return ShardedTokens(self.shard_paths(split), self.meta["dtype"])


def check_settings(meta: dict, job: JobConfig, data_dir: Path) -> None:
    """Raise UserError (one line) when prepared data was made with other settings than the job's."""
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"prepared data in {data_dir} has format {meta.get('format')}, this hvdllm "
                        f"reads format {FORMAT_VERSION}; {FIX}")
    prepared = meta.get("settings", {})
    diffs = [f"{k} is {prepared.get(k)!r} there, {v!r} in the job"
             for k, v in job_settings(job).items() if prepared.get(k) != v]
    if diffs:
        raise UserError(f"prepared data in {data_dir} does not match this job: {'; '.join(diffs)}; {FIX}")


def read_prepared(data_dir: Path) -> PreparedData:
    """Open a prepared directory without a job (no settings check; the format is checked)."""
    meta = read_json(data_dir / "meta.json")
    if meta is None:
        raise UserError(f"no prepared data in {data_dir}; {FIX}")
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"prepared data in {data_dir} has format {meta.get('format')}, this hvdllm "
                        f"reads format {FORMAT_VERSION}; {FIX}")
    return PreparedData(data_dir, meta)


def load_prepared(job: JobConfig) -> PreparedData:
    """Open prepared data, or raise UserError saying why it cannot be used for this job.

    Reads only the prepared directory: the source corpus need not exist on this node. A source
    that changed since is noticed by `prepare` (which rebuilds), not here.
    """
    prepared = read_prepared(job.data_dir)
    check_settings(prepared.meta, job, job.data_dir)
    missing = [p for s in ("train", "val") for p in prepared.shard_paths(s) if not p.is_file()]
    if missing:
        raise UserError(f"prepared data in {job.data_dir} lacks {missing[0].relative_to(job.data_dir)} "
                        f"(and {len(missing) - 1} more shards); {FIX}")
    return prepared
