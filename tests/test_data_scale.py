"""Data at scale: bounded memory, resume after a kill, ranks = one process, reading shards."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SCRIPTS, TINY, env, hvdllm, mpirun, run

from hvdllm.config import load_job
from hvdllm.data import ShardedTokens, TokenReader, load_prepared, prepare
from hvdllm.data.shards import KILL_AFTER_SHARD
from hvdllm.errors import UserError


def write_jsonl_corpus(root: Path, files: int, mb_per_file: float, seed: int = 0) -> None:
    """`files` .jsonl files of about mb_per_file MB each: documents of random made-up words."""
    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9)))
             for _ in range(3000)]
    docs = [" ".join(rng.choices(words, k=rng.randint(50, 600))) for _ in range(500)]
    root.mkdir(parents=True)
    i = 0
    for k in range(files):
        with (root / f"part-{k:03d}.jsonl").open("w") as f:
            while f.tell() < mb_per_file * 1e6:
                f.write(json.dumps({"text": f"doc {i} {docs[i % len(docs)]}"}) + "\n")
                i += 1


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root by relative name, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def prepare_args(source: Path, data: Path, *extra: str) -> list[str]:
    sets = [f"data.source={source}", f"data.dir={data}", "data.vocab_size=1024", *extra]
    return [a for s in sets for a in ("--set", s)]


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    """Peak RSS of `hvdllm prepare` (one worker, one thread) on 8 MB and on 64 MB of jsonl.

    Measured on the 2-core dev box: 313 MB and 316 MB. Tolerance: the larger corpus may use at
    most 25 MB more; holding its text would add over 56 MB, its tokens over 60 MB."""
    peaks = []
    for name, files in (("1x", 4), ("8x", 32)):
        write_jsonl_corpus(tmp_path / name, files, 2.0)
        out = tmp_path / f"{name}.rss"
        cmd = [sys.executable, SCRIPTS / "peak_rss.py", out, *hvdllm(
            "prepare", TINY, *prepare_args(tmp_path / name, tmp_path / f"d{name}", "data.workers=1",
                                           "data.tokenizer_sample_bytes=2000000",
                                           "data.shard_bytes=4000000"))]
        p = subprocess.run([str(c) for c in cmd], env={**env(), "TOKENIZERS_PARALLELISM": "false"},
                           capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stderr[-3000:]
        peaks.append(float(out.read_text()))
    meta = json.loads((tmp_path / "d8x" / "meta.json").read_text())
    assert meta["text_bytes"] > 60e6 and len(meta["train"]["shards"]) >= 16
    assert peaks[1] - peaks[0] < 25, f"peak RSS {peaks[0]:.0f} MB at 8 MB, {peaks[1]:.0f} MB at 64 MB"


def test_an_interrupted_prepare_resumes_to_the_same_bytes(tmp_path):
    """SIGKILL once unit 1 has written two shards (mid-unit), rerun: byte for byte the same
    directory as an uninterrupted prepare."""
    write_jsonl_corpus(tmp_path / "c", 3, 0.6)
    run(hvdllm("prepare", TINY, *prepare_args(tmp_path / "c", tmp_path / "whole",
                                              "data.shard_bytes=65536")))
    whole = tree(tmp_path / "whole")
    unit0 = sum(n.split("/")[-1].startswith("00000-") for n in whole)
    assert unit0 >= 4 and sum(n.startswith("train/00001-") for n in whole) >= 4
    args = prepare_args(tmp_path / "c", tmp_path / "killed", "data.shard_bytes=65536",
                        "data.workers=1")
    p = subprocess.run([str(c) for c in hvdllm("prepare", TINY, *args)], capture_output=True,
                       text=True, timeout=240, env={**env(), KILL_AFTER_SHARD: str(unit0 + 2)})
    assert p.returncode == -9, p.stderr[-2000:]
    left = tree(tmp_path / "killed")
    assert "meta.json" not in left and "progress.json" in left and "units/00000.json" in left
    assert sorted(n for n in left if "/00001-" in n) == ["train/00001-0000.bin", "train/00001-0001.bin"]
    assert not any(n.startswith("units/00001") for n in left)  # unit 1 was cut off mid-way
    job = load_job(TINY, [a for a in args if a != "--set"])
    with pytest.raises(UserError, match="no prepared data in"):
        load_prepared(job)
    again = run(hvdllm("prepare", TINY, *args))
    assert "resuming the prepare" in again.stderr and "1 of 3 units done" in again.stderr
    assert tree(tmp_path / "killed") == whole
    assert "units/00000.json" not in whole and "progress.json" not in whole


@pytest.mark.mpi
def test_two_ranks_write_what_one_process_writes(tmp_path):
    """`mpirun -np 2 hvdllm prepare` (one worker each) == one process with two workers; a bad
    record on rank 1's share ends both ranks with the one line (exit 2, no hang)."""
    write_jsonl_corpus(tmp_path / "c", 5, 0.3)
    one = run(hvdllm("prepare", TINY, *prepare_args(tmp_path / "c", tmp_path / "one",
                                                    "data.shard_bytes=65536", "data.workers=2")))
    assert "on 2 workers" in one.stderr
    mpirun(2, hvdllm("prepare", TINY, *prepare_args(tmp_path / "c", tmp_path / "two",
                                                    "data.shard_bytes=65536", "data.workers=1")),
           timeout=240)
    assert tree(tmp_path / "two") == tree(tmp_path / "one")
    assert len(json.loads((tmp_path / "one" / "meta.json").read_text())["train"]["shards"]) >= 10
    with (tmp_path / "c" / "part-001.jsonl").open("a") as f:  # unit 1: rank 1's
        f.write('{"body": "no text"}\n')
    bad = mpirun(2, hvdllm("prepare", TINY, *prepare_args(tmp_path / "c", tmp_path / "bad",
                                                          "data.shard_bytes=65536",
                                                          "data.workers=1")),
                 timeout=240, check=False)
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert "part-001.jsonl: record " in bad.stderr and ": no 'text' field" in bad.stderr


def test_sharded_tokens_read_like_one_array(tmp_path):
    """Windows that cross shard boundaries: the reader gives the same batches as on one array."""
    flat = (np.arange(50_000) * 7919 % 65_000).astype(np.uint16)
    cuts = [0, 1, 1000, 1001, 17_000, 33_333, 50_000]  # includes an empty shard
    paths = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        paths.append(tmp_path / f"{i}.bin")
        flat[a:b].tofile(paths[-1])
    sharded = ShardedTokens(paths, "uint16")
    assert sharded.size == len(sharded) == flat.size
    assert np.array_equal(np.asarray(sharded), flat) and np.array_equal(sharded[990:1010], flat[990:1010])
    for seed in (0, 3):
        a, b = TokenReader(flat, 31, 16, seed), TokenReader(sharded, 31, 16, seed)
        for step in (0, 5):
            for r in range(2):
                xa, ya = a.micro_batch(step, r, 1, 4, 2)
                xb, yb = b.micro_batch(step, r, 1, 4, 2)
                assert bool((xa == xb).all()) and bool((ya == yb).all())
        assert all(bool((p[0] == q[0]).all()) for p, q in zip(a.eval_batches(2, 0, 1, 4),
                                                             b.eval_batches(2, 0, 1, 4)))
    with pytest.raises(IndexError):
        sharded[np.array([flat.size])]


def test_the_single_file_format_is_refused_with_the_fix(tmp_path, tiny_data):
    """A format-2 directory (train.bin, val.bin) is refused by train in one line; prepare
    replaces it."""
    old = tmp_path / "old"
    old.mkdir()
    meta = json.loads((tiny_data / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({**meta, "format": 2}))
    (old / "train.bin").write_bytes(b"\0" * 64)
    job = load_job(TINY, [f"data.dir={old}"])
    with pytest.raises(UserError, match=r"has format 2, this hvdllm reads format 3; run: hvdllm prepare"):
        load_prepared(job)
    prepare(job)
    assert not (old / "train.bin").exists() and load_prepared(job).meta["format"] == 3

