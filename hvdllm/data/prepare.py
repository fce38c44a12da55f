"""`hvdllm prepare`: documents -> tokenizer -> flat train/val token files + meta.json.

The output directory holds tokenizer/ (a Hugging Face tokenizer), train.bin and val.bin (uint16
when the vocabulary fits, else uint32; documents separated by the end-of-text token) and
meta.json. The whole directory is built under a temporary name and renamed into place, so an
interrupted run never leaves files that look complete. Re-running with the same inputs and
settings does nothing; anything different rebuilds.
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
from hvdllm.data.sources import Document, fingerprint_files, iter_documents, source_files
from hvdllm.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe
from hvdllm.errors import UserError
from hvdllm.log import logger

FORMAT_VERSION = 1


@dataclass
class PreparedData:
    dir: Path
    meta: dict

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / "tokenizer"

    def tokens(self, split: str) -> np.ndarray:
        return np.memmap(self.dir / f"{split}.bin", dtype=self.meta["dtype"], mode="r")


def _settings_key(job: JobConfig, files: list[Path]) -> str:
    d = job.data
    settings = [FORMAT_VERSION, d.source, d.tokenizer, d.vocab_size if d.tokenizer == "bpe" else 0,
                d.val_fraction, job.run.seed, fingerprint_files(files)]
    if d.tokenizer != "bpe":
        settings.append(tokenizer_fingerprint(d.tokenizer))
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]


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
    """Open prepared data, or raise UserError saying why it cannot be used for this job."""
    meta_path = job.data_dir / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"no prepared data in {job.data_dir}; run: hvdllm prepare JOB.toml")
    meta = json.loads(meta_path.read_text())
    files = source_files(job.data.source)
    if meta.get("key") != _settings_key(job, files):
        raise UserError(f"prepared data in {job.data_dir} does not match this job's [data] section "
                         f"or its source files changed; run: hvdllm prepare JOB.toml")
    return PreparedData(job.data_dir, meta)


def prepare(job: JobConfig) -> PreparedData:
    """Build train/val token files for the job (a no-op when they are already up to date)."""
    out = job.data_dir
    files = source_files(job.data.source)
    key = _settings_key(job, files)
    if (out / "meta.json").is_file() and json.loads((out / "meta.json").read_text()).get("key") == key:
        logger.info("prepared data in %s is up to date", out)
        return load_prepared(job)

    start = time.time()
    docs = list(iter_documents(files))
    train_docs, val_docs = _split(docs, job)
    logger.info("%d documents (%d train, %d val) from %s", len(docs), len(train_docs),
                len(val_docs), job.data.source)
    if job.data.tokenizer == "bpe":
        logger.info("training byte-level BPE, vocab %d", job.data.vocab_size)
        tok = train_bpe((d.text for d in train_docs), job.data.vocab_size)
    else:
        tok = load_tokenizer(job.data.tokenizer)
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
    meta = {"key": key, "format": FORMAT_VERSION, "source": job.data.source, "dtype": dtype,
            "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
            "tokenizer_fingerprint": tokenizer_fingerprint(tmp / "tokenizer"), **counts}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    logger.info("prepared %s train / %s val tokens in %s (%.0f s)", f"{counts['train']['tokens']:,}",
                f"{counts['val']['tokens']:,}", out, time.time() - start)
    return PreparedData(out, meta)
