"""Corpus sources, BPE training, token files + meta, and the deterministic reader."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, hvdllm, run
from transformers import AutoTokenizer

from hvdllm.config import load_job
from hvdllm.data import TokenReader, load_prepared, prepare
from hvdllm.data.sources import source_files
from hvdllm.data.tokenizer import train_bpe

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_stdlib_source_has_the_standard_library():
    files = source_files("python-stdlib/json")
    assert STDLIB / "json" / "decoder.py" in files
    assert all("site-packages" not in f.parts for f in source_files("python-stdlib/email"))
    with pytest.raises(ValueError, match="matches no"):
        source_files(str(STDLIB / "no-such-dir" / "*.py"))


def test_bpe_round_trip_on_stdlib_text():
    texts = [p.read_text() for p in source_files("python-stdlib/json")]
    tok = train_bpe(texts, vocab_size=400)
    assert len(tok) == 400
    sample = (STDLIB / "json" / "encoder.py").read_text()[:3000] + "\n# ünïcødé ✓ \t\x00"
    ids = tok.encode(sample)
    assert len(ids) < len(sample.encode())  # merges actually compress
    assert tok.decode(ids) == sample


def test_prepare_writes_tokens_meta_and_loadable_tokenizer(tiny_data):
    meta = json.loads((tiny_data / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 512
    train = np.fromfile(tiny_data / "train.bin", dtype=np.uint16)
    assert train.size == meta["train"]["tokens"] > 10_000
    assert meta["val"]["documents"] >= 1 and meta["train"]["documents"] > meta["val"]["documents"]
    tok = AutoTokenizer.from_pretrained(str(tiny_data / "tokenizer"))  # transformers' own loader
    assert tok.eos_token_id == meta["eos_token_id"]
    assert int(train.max()) < len(tok)
    assert int((train == tok.eos_token_id).sum()) == meta["train"]["documents"]
    assert "def " in tok.decode(train[:2000].tolist())


def test_prepare_is_a_no_op_when_unchanged_and_rebuilds_on_change(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "hello world, tokens! " * (50 + i))
    job = load_job(TINY, [f"data.source={corpus}", f"data.dir={tmp_path / 'data'}", "data.vocab_size=300"])
    first = prepare(job)
    stamp = (first.dir / "train.bin").stat().st_mtime_ns
    assert prepare(job).meta == first.meta
    assert (first.dir / "train.bin").stat().st_mtime_ns == stamp  # nothing rewritten
    (corpus / "doc0.txt").write_text("changed " * 100)
    assert prepare(job).meta["key"] != first.meta["key"]
    job.data.vocab_size = 320
    with pytest.raises(ValueError, match="does not match this job"):
        load_prepared(job)


def test_jsonl_source_and_bad_lines(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"line {i} " * 40}) for i in range(10)) + "\n")
    job = load_job(TINY, [f"data.source={src}", f"data.dir={tmp_path / 'd'}", "data.vocab_size=300"])
    assert prepare(job).meta["train"]["documents"] + prepare(job).meta["val"]["documents"] == 10
    src.write_text('{"txt": "no text field"}\n')
    p = run(hvdllm("prepare", TINY, "--set", f"data.source={src}", "--set",
                   f"data.dir={tmp_path / 'e'}"), check=False)
    assert p.returncode == 2 and 'c.jsonl:1: expected a JSON object with a "text" field' in p.stderr


def test_local_tokenizer_directory(tmp_path, tiny_data):
    job = load_job(TINY, [f"data.tokenizer={tiny_data / 'tokenizer'}", f"data.dir={tmp_path / 'd'}"])
    prepared = prepare(job)
    assert prepared.meta["tokenizer_fingerprint"] == json.loads(
        (tiny_data / "meta.json").read_text())["tokenizer_fingerprint"]


def test_reader_is_deterministic_and_rank_disjoint():
    tokens = np.arange(100_000, dtype=np.uint16) % 60_000
    reader = TokenReader(tokens, seq_len=16, global_batch_size=8, seed=7)
    x, y = reader.micro_batch(step=3, replica=0, micro=0, micro_batch_size=2, replicas=2)
    assert x.shape == (2, 16) and torch_equal(x[:, 1:], y[:, :-1])
    again = TokenReader(tokens, 16, 8, 7).micro_batch(3, 0, 0, 2, 2)
    assert torch_equal(x, again[0])  # same (seed, step, rank, micro) -> same windows
    # The union over replicas and micro-batches is the global batch, whatever the layout.
    one_rank = [reader.micro_batch(3, 0, m, 2, 1)[0] for m in range(4)]
    two_ranks = [reader.micro_batch(3, r, m, 2, 2)[0] for m in range(2) for r in range(2)]
    assert sorted(map(tuple, np.concatenate(one_rank).tolist())) == \
        sorted(map(tuple, np.concatenate(two_ranks).tolist()))
    starts = [int(reader.micro_batch(3, r, 0, 2, 2)[0][i, 0]) for r in range(2) for i in range(2)]
    assert len(set(starts)) == 4  # different ranks see different windows
    assert not torch_equal(x, reader.micro_batch(4, 0, 0, 2, 2)[0])  # next step, new data
    with pytest.raises(IndexError):
        reader.micro_batch(3, 0, 2, 2, 2)


def test_eval_windows_split_across_replicas():
    tokens = np.arange(10_000, dtype=np.uint16)
    reader = TokenReader(tokens, seq_len=15, global_batch_size=4, seed=0)
    whole = np.concatenate([b[0].numpy() for b in reader.eval_batches(2, 0, 1, 2)])
    parts = [np.concatenate([b[0].numpy() for b in reader.eval_batches(2, r, 2, 2)]) for r in range(2)]
    assert len(whole) == 8 and sorted(map(tuple, whole.tolist())) == \
        sorted(map(tuple, np.concatenate(parts).tolist()))


def torch_equal(a, b) -> bool:
    return bool((a == b).all())
