"""`hvdllm prepare`: documents -> tokenizer -> token shards + the index (meta.json).

Streaming and bounded: the source's files are grouped into work units (sources.plan_units);
documents stream through a unit's worker and leave as token shards (shards.py), so memory does
not grow with the corpus. The BPE is trained on a bounded sample (`data.tokenizer_sample_bytes`),
an equal share from the start of every unit's training documents.

Parallel: the units are dealt round-robin over the ranks (`mpirun -np N hvdllm prepare JOB`),
and each rank runs its units on `data.workers` processes (workers.py). Rank 0 trains the
tokenizer first and writes the index last. Shard names and contents depend only on the unit, so
the result is the same bytes for any number of ranks and workers.

Resumable: finished units are recorded under units/; a rerun with the same key keeps them and
tokenizes the rest. The layout of the directory and meta.json are described in index.py.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tqdm import tqdm

from hvdllm.config import JobConfig
from hvdllm.data.index import (FORMAT_VERSION, PreparedData, job_layout, job_settings, load_prepared, prepare_key,
                               read_json)
from hvdllm.data.shards import SPLITS, UnitResult, UnitTask, is_val, load_unit, write_atomic
from hvdllm.data.sources import Source, Unit, fingerprint_files, plan_units, resolve_source
from hvdllm.data.workers import run_units, worker_count
from hvdllm.data.world import World
from hvdllm.errors import UserError
from hvdllm.log import logger

OWNED = ("meta.json", "progress.json", "units", "tokenizer", "train", "val", "train.bin", "val.bin")
"""What prepare writes in data.dir (and removes before a rebuild); format 2's files included."""


def inputs_fingerprint(job: JobConfig, source: Source) -> str:
    """What `prepare` read: the source files (name, size, mtime) and a given tokenizer's file."""
    from hvdllm.data.tokenizer import tokenizer_fingerprint

    parts = [fingerprint_files(source)]
    if job.data.tokenizer != "bpe":
        parts.append(tokenizer_fingerprint(job.data.tokenizer))
    return json.dumps(parts)


def _check(job: JobConfig) -> None:
    d = job.data
    for name in ("tokenizer_sample_bytes", "shard_bytes"):
        if getattr(d, name) < 1 << 16:
            raise UserError(f"data.{name} must be at least 65536 (it is {getattr(d, name)})")
    if d.workers < 0 or not d.text_field:
        raise UserError("data.workers must be >= 0 and data.text_field not empty")


def prepare(job: JobConfig, world: World | None = None) -> PreparedData:
    """Build the job's token shards and index (a no-op when they are up to date). With a World
    of several ranks, every rank calls this and tokenizes its share of the units."""
    world = world or World()
    _check(job)
    out = job.data_dir
    source = resolve_source(job.data.source)
    settings, layout = job_settings(job), job_layout(job)
    key = prepare_key(settings, layout, inputs_fingerprint(job, source))
    old = read_json(out / "meta.json")
    if old is not None and old.get("key") == key and old.get("format") == FORMAT_VERSION:
        logger.info("prepared data in %s is up to date", out)
        return load_prepared(job)

    start = time.time()
    units = plan_units(source, job.data.shard_bytes)
    world.agree(lambda: _begin(job, out, key, units) if world.rank == 0 else None)
    info = json.loads((out / "progress.json").read_text())
    tasks = [_task(job, out, u, info) for u in units[world.rank::world.size]]
    fresh = world.agree(lambda: _run_my_units(tasks, units, job, world.rank))
    gathered = world.gather([r.__dict__ for r in fresh])
    meta = None
    if world.rank == 0:
        new = [UnitResult(**r) for rank_results in gathered for r in rank_results]
        meta = world.agree(lambda: _finish(job, out, key, source, len(units), info))
        _log_done(meta, new, time.time() - start, out)
    else:
        world.agree(lambda: None)
    return PreparedData(out, world.bcast(meta))


def _begin(job: JobConfig, out: Path, key: str, units: list[Unit]) -> None:
    """Rank 0: keep an interrupted run of the same key, or clear data.dir and make the tokenizer."""
    progress = read_json(out / "progress.json")
    if progress is not None and progress.get("key") == key:
        done = len(list((out / "units").glob("*.json")))
        logger.info("resuming the prepare in %s: %d of %d units done", out, done, len(units))
        return
    for name in OWNED:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(job, units)
    tok.save_pretrained(out / "tokenizer")
    info = {"key": key, "dtype": "uint16" if len(tok) <= 65536 else "uint32",
            "vocab_size": len(tok), "eos_token_id": tok.eos_token_id}
    write_atomic(out / "progress.json", json.dumps(info).encode())


def _tokenizer(job: JobConfig, units: list[Unit]):
    """Train the BPE on a bounded sample of the training documents, or load the job's tokenizer."""
    from hvdllm.data.tokenizer import load_tokenizer, sample_texts, train_bpe  # transformers

    d = job.data
    if d.tokenizer != "bpe":
        return load_tokenizer(d.tokenizer)
    logger.info("training byte-level BPE, vocab %d, on at most %.0f MB of training documents",
                d.vocab_size, d.tokenizer_sample_bytes / 1e6)
    keep = lambda name: not is_val(name, job.run.seed, d.val_fraction)  # noqa: E731
    sample = sample_texts(units, d.tokenizer_sample_bytes, d.text_field, keep,
                          d.on_bad_record == "skip")
    return train_bpe(sample, d.vocab_size)


def _task(job: JobConfig, out: Path, unit: Unit, info: dict) -> UnitTask:
    d = job.data
    itemsize = 2 if info["dtype"] == "uint16" else 4
    return UnitTask(unit.index, tuple(map(str, unit.files)), unit.names, str(out), info["dtype"],
                    info["eos_token_id"], job.run.seed, d.val_fraction, d.text_field,
                    d.on_bad_record == "skip", max(1, d.shard_bytes // itemsize))


def _run_my_units(tasks: list[UnitTask], units: list[Unit], job: JobConfig,
                  rank: int) -> list[UnitResult]:
    """This rank's units not finished by an earlier run; returns the results of those it ran."""
    out = Path(tasks[0].out) if tasks else job.data_dir
    todo = [t for t in tasks if load_unit(out, t.index) is None]
    total = sum(units[t.index].bytes for t in todo)
    workers = worker_count(job.data.workers, len(todo))
    logger.info("tokenizing %d units (%.1f MB) on %d worker%s", len(todo), total / 1e6, workers,
                "s" if workers > 1 else "")
    with tqdm(total=total, desc="tokenizing", unit="B", unit_scale=True, mininterval=1.0,
              disable=True if rank else None) as bar:
        return run_units(todo, workers, bar.update)


def _finish(job: JobConfig, out: Path, key: str, source: Source, n_units: int,
            info: dict) -> dict:
    """Rank 0: the index from every unit's record, written last; the progress files removed."""
    from hvdllm.data.tokenizer import tokenizer_fingerprint

    results = [load_unit(out, i) for i in range(n_units)]
    if any(r is None for r in results):
        raise RuntimeError(f"{out}: a unit has no record after every rank finished")
    splits = {s: [sh for r in results for sh in r.shards[s]] for s in SPLITS}
    _hold_out_one(out, splits, job, info)
    meta = {"key": key, "format": FORMAT_VERSION, "settings": job_settings(job), "layout": job_layout(job),
            "inputs": inputs_fingerprint(job, source), "source": job.data.source,
            "files": len(source.files), "units": n_units, "dtype": info["dtype"],
            "vocab_size": info["vocab_size"], "eos_token_id": info["eos_token_id"],
            "tokenizer_fingerprint": tokenizer_fingerprint(out / "tokenizer"),
            "text_bytes": sum(r.text_bytes for r in results),
            "skipped": {"records": sum(r.skipped for r in results),
                        "first": next((r.first_problem for r in results if r.first_problem), "")},
            **{s: {"documents": sum(sh[2] for sh in splits[s]),
                   "tokens": sum(sh[1] for sh in splits[s]), "shards": splits[s]} for s in SPLITS}}
    write_atomic(out / "meta.json", (json.dumps(meta, indent=1) + "\n").encode())
    shutil.rmtree(out / "units", ignore_errors=True)
    (out / "progress.json").unlink(missing_ok=True)
    return meta


def _hold_out_one(out: Path, splits: dict[str, list[list]], job: JobConfig, info: dict) -> None:
    """Always hold out a document: when the hash put none on the validation side, the last
    training document moves there (its shard is rewritten without it)."""
    import numpy as np

    if not splits["val"] and splits["train"]:
        name, tokens, docs = splits["train"][-1]
        data = np.fromfile(out / name, dtype=info["dtype"])
        eos = np.flatnonzero(data == info["eos_token_id"])
        cut = int(eos[-2]) + 1 if len(eos) > 1 and docs > 1 else 0
        val_name = "val/" + Path(name).name
        write_atomic(out / val_name, data[cut:].tobytes())
        splits["val"].append([val_name, int(data.size - cut), 1])
        if cut:
            write_atomic(out / name, data[:cut].tobytes())
            splits["train"][-1] = [name, cut, docs - 1]
        else:
            splits["train"].pop()
    if sum(sh[2] for sh in splits["train"]) == 0:
        raise UserError(f"data.source {job.data.source!r} has too few documents to split train/val")


def _log_done(meta: dict, new: list[UnitResult], seconds: float, out: Path) -> None:
    """The final line: documents, tokens, shards, seconds and throughput (of this run's work)."""
    docs = meta["train"]["documents"] + meta["val"]["documents"]
    tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
    shards = len(meta["train"]["shards"]) + len(meta["val"]["shards"])
    mb = sum(r.text_bytes for r in new) / 1e6
    made = sum(sh[1] for r in new for s in SPLITS for sh in r.shards[s])
    if meta["skipped"]["records"]:
        logger.warning("skipped %d bad records (first: %s)", meta["skipped"]["records"],
                       meta["skipped"]["first"])
    logger.info("prepared %s documents (%s train / %s val), %s tokens, %d shards in %s: %.1f s, "
                "%.2f MB/s, %s tokens/s", f"{docs:,}", f"{meta['train']['documents']:,}",
                f"{meta['val']['documents']:,}", f"{tokens:,}", shards, out, seconds,
                mb / max(seconds, 1e-9), f"{made / max(seconds, 1e-9):,.0f}")
