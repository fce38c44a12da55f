"""`hvdllm prepare`: documents -> tokenizer -> flat train/val token files + meta.json.

The output directory holds tokenizer/ (a Hugging Face tokenizer), train.bin and val.bin (uint16
when the vocabulary fits, else uint32; documents separated by the end-of-text token) and
meta.json. The whole directory is built under a temporary name and renamed into place, so an
interrupted run never leaves files that look complete.

meta.json keeps two things apart: `settings`, the job values that shape the tokens (checked by
`train` from the job alone, so training needs only this directory), and `inputs`, a fingerprint
of what `prepare` read (the source files, a given tokenizer). Re-running `prepare` with the same
settings and inputs does nothing; anything different rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hvdllm.config import JobConfig
from hvdllm.data.sources import Document, Source, fingerprint_files, iter_documents, resolve_source
from hvdllm.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe
from hvdllm.errors import UserError
from hvdllm.log import logger

FORMAT_VERSION = 2
"""2: meta.json holds the job settings and the inputs' fingerprint apart."""


@dataclass
class PreparedData:
    dir: Path
    meta: dict

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / "tokenizer"

    def tokens(self, split: str) -> np.ndarray:
        return np.memmap(self.dir / f"{split}.bin", dtype=self.meta["dtype"], mode="r")


def job_settings(job: JobConfig) -> dict:
    """The job's values that shape the tokens, read from the job alone (no file is opened).

    `hvdllm train` compares these with meta.json's, so a node that holds only the prepared
    directory can train. data.seq_len is not among them: windows are cut when training reads.
    """
    d = job.data
    return {"data.source": d.source, "data.tokenizer": d.tokenizer,
            "data.vocab_size": d.vocab_size if d.tokenizer == "bpe" else 0,
            "data.val_fraction": d.val_fraction, "run.seed": job.run.seed}


def inputs_fingerprint(job: JobConfig, source: Source) -> str:
    """What `prepare` read: the source files (path, size, mtime) and a given tokenizer's file."""
    parts = [fingerprint_files(source.files)]
    if job.data.tokenizer != "bpe":
        parts.append(tokenizer_fingerprint(job.data.tokenizer))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _key(settings: dict, inputs: str) -> str:
    """The whole key `prepare` compares: format, settings and inputs."""
    return hashlib.sha256(json.dumps([FORMAT_VERSION, settings, inputs]).encode()).hexdigest()[:16]


def _read_meta(data_dir: Path) -> dict | None:
    path = data_dir / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else None


def check_settings(meta: dict, job: JobConfig, data_dir: Path) -> None:
    """Raise UserError (one line) when prepared data was made with other settings than the job's."""
    fix = "run: hvdllm prepare JOB.toml"
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"prepared data in {data_dir} has format {meta.get('format')}, this hvdllm "
                        f"reads format {FORMAT_VERSION}; {fix}")
    prepared = meta.get("settings", {})
    diffs = [f"{k} is {prepared.get(k)!r} there, {v!r} in the job"
             for k, v in job_settings(job).items() if prepared.get(k) != v]
    if diffs:
        raise UserError(f"prepared data in {data_dir} does not match this job: {'; '.join(diffs)}; {fix}")


def _is_val(doc: Document, seed: int, fraction: float) -> bool:
    """Deterministic split by document name: the same document always lands on the same side."""
    return (zlib.crc32(f"{seed}:{doc.name}".encode()) % 1_000_000) < fraction * 1_000_000


def _split(docs: list[Document], job: JobConfig) -> tuple[list[Document], list[Document]]:
    val = [d for d in docs if _is_val(d, job.run.seed, job.data.val_fraction)]
    train = [d for d in docs if not _is_val(d, job.run.seed, job.data.val_fraction)]
    if not val:  # always hold out something, even for tiny corpora
        val, train = train[-1:], train[:-1]
    if not train:
        raise UserError(f"data.source {job.data.source!r} has too few documents to split train/val")
    return train, val


def _encode(tok, docs: list[Document], dtype: str, desc: str, chunk: int = 256) -> np.ndarray:
    parts: list[np.ndarray] = []
    eos = tok.eos_token_id
    with tqdm(total=sum(len(d.text) for d in docs), desc=desc, unit="B", unit_scale=True,
              disable=None, mininterval=1.0) as bar:
        for i in range(0, len(docs), chunk):
            texts = [d.text for d in docs[i:i + chunk]]
            for enc in tok.backend_tokenizer.encode_batch(texts):  # Rust, all cores
                parts.append(np.asarray(enc.ids + [eos], dtype=dtype))
            bar.update(sum(len(t) for t in texts))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def load_prepared(job: JobConfig) -> PreparedData:
    """Open prepared data, or raise UserError saying why it cannot be used for this job.

    Reads only the prepared directory: the source corpus need not exist on this node. A source
    that changed since is noticed by `prepare` (which rebuilds), not here.
    """
    meta = _read_meta(job.data_dir)
    if meta is None:
        raise UserError(f"no prepared data in {job.data_dir}; run: hvdllm prepare JOB.toml")
    check_settings(meta, job, job.data_dir)
    return PreparedData(job.data_dir, meta)


def prepare(job: JobConfig) -> PreparedData:
    """Build train/val token files for the job (a no-op when they are already up to date)."""
    out = job.data_dir
    source = resolve_source(job.data.source)
    settings, inputs = job_settings(job), inputs_fingerprint(job, source)
    key = _key(settings, inputs)
    old = _read_meta(out)
    if old is not None and old.get("key") == key:
        logger.info("prepared data in %s is up to date", out)
        return load_prepared(job)

    start = time.time()
    docs = list(iter_documents(source))
    train_docs, val_docs = _split(docs, job)
    logger.info("%d documents (%d train, %d val) from %s: %d files, %.2f MB", len(docs),
                len(train_docs), len(val_docs), job.data.source, len(source.files),
                sum(len(d.text.encode()) for d in docs) / 1e6)
    tok = _tokenizer(job, train_docs)
    dtype = "uint16" if len(tok) <= 65536 else "uint32"

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok.save_pretrained(tmp / "tokenizer")
    counts = {}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        tokens = _encode(tok, split_docs, dtype, f"tokenizing {split}")
        tokens.tofile(tmp / f"{split}.bin")
        counts[split] = {"documents": len(split_docs), "tokens": int(tokens.size)}
    meta = {"key": key, "format": FORMAT_VERSION, "settings": settings, "inputs": inputs,
            "source": job.data.source, "files": len(source.files), "dtype": dtype,
            "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
            "tokenizer_fingerprint": tokenizer_fingerprint(tmp / "tokenizer"), **counts}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    logger.info("prepared %s train / %s val tokens in %s (%.0f s)", f"{counts['train']['tokens']:,}",
                f"{counts['val']['tokens']:,}", out, time.time() - start)
    return PreparedData(out, meta)


def _tokenizer(job: JobConfig, train_docs: list[Document]):
    """Train the BPE on the training documents, or load the job's tokenizer directory."""
    if job.data.tokenizer != "bpe":
        return load_tokenizer(job.data.tokenizer)
    logger.info("training byte-level BPE, vocab %d", job.data.vocab_size)
    return train_bpe((d.text for d in train_docs), job.data.vocab_size)
