"""Corpus sources, BPE training, token files + meta, and the deterministic reader."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, hvdllm, run
from transformers import AutoTokenizer

from hvdllm.config import load_job
from hvdllm.data import TokenReader, load_prepared, prepare, read_prepared
from hvdllm.data.shards import is_val
from hvdllm.data.sources import iter_documents, resolve_source, source_files
from hvdllm.data.tokenizer import train_bpe

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_stdlib_source_has_the_standard_library():
    files = source_files("python-stdlib/json")
    assert STDLIB / "json" / "decoder.py" in files
    assert all("site-packages" not in f.parts for f in source_files("python-stdlib/email"))
    with pytest.raises(ValueError, match="matches no"):
        source_files(str(STDLIB / "no-such-dir" / "*.py"))


def test_default_corpus_is_python_code_not_tables_or_tests():
    names = {f.relative_to(STDLIB).as_posix() for f in source_files("python-stdlib")}
    assert {"json/decoder.py", "argparse.py", "email/parser.py", "unittest/mock.py"} <= names
    for left_out in ("encodings/", "test/", "idlelib/", "pydoc_data/", "unittest/test/"):
        assert not any(n.startswith(left_out) for n in names), left_out
    assert "html/entities.py" not in names and "stringprep.py" not in names
    assert not any(n.startswith("_sysconfigdata_") for n in names)
    # Naming an excluded package takes it whole; tests below a named package stay out.
    assert STDLIB / "encodings" / "cp1252.py" in source_files("python-stdlib/encodings")
    assert not any("test" in f.parts for f in source_files("python-stdlib/unittest"))


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
    assert [name for name, _, _ in meta["train"]["shards"]] == ["train/00000-0000.bin"]
    train = np.asarray(read_prepared(tiny_data).tokens("train"))
    assert train.dtype == np.uint16
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
    shard = first.shard_paths("train")[0]
    stamp = shard.stat().st_mtime_ns
    assert prepare(job).meta == first.meta
    assert shard.stat().st_mtime_ns == stamp  # nothing rewritten
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
    assert p.returncode == 2 and "c.jsonl: record 1: no 'text' field" in p.stderr


def write_shards(corpus: Path) -> None:
    """Three .jsonl shards (one in a subdirectory) and a file that is not a shard."""
    (corpus / "sub").mkdir(parents=True)
    for name, first in (("b.jsonl", 10), ("a.jsonl", 0), ("sub/c.jsonl", 20)):
        (corpus / name).write_text("".join(json.dumps({"text": f"shard doc {i} " * 30}) + "\n"
                                           for i in range(first, first + 10)))
    (corpus / "notes.csv").write_text("not,a,shard\n")


def test_directory_and_glob_of_jsonl_shards(tmp_path):
    corpus = tmp_path / "corpus"
    write_shards(corpus)
    whole = resolve_source(str(corpus))
    assert [whole.name_of(f) for f in whole.files] == ["a.jsonl", "b.jsonl", "sub/c.jsonl"]
    docs = list(iter_documents(whole))
    assert [d.name for d in docs[:2]] == ["a.jsonl:1", "a.jsonl:2"] and len(docs) == 30
    assert docs[10].text.startswith("shard doc 10 ")  # sorted file order, lines in order
    top = list(iter_documents(resolve_source(f"{corpus}/*.jsonl")))
    assert [d.name for d in top] == [d.name for d in docs[:20]]
    # Names are relative to the source, so a moved corpus splits the same way.
    moved = tmp_path / "elsewhere" / "corpus"
    shutil.copytree(corpus, moved)
    job = load_job(TINY, [f"data.source={moved}/**/*.jsonl", f"data.dir={tmp_path / 'd'}",
                          "data.vocab_size=300"])
    moved_docs = list(iter_documents(resolve_source(job.data.source)))
    assert [d.name for d in moved_docs] == [d.name for d in docs]
    val = [d.name for d in docs if is_val(d.name, job.run.seed, job.data.val_fraction)]
    assert [d.name for d in moved_docs if is_val(d.name, job.run.seed, job.data.val_fraction)] == val
    meta = prepare(job).meta
    assert meta["files"] == 3 and meta["train"]["documents"] + meta["val"]["documents"] == 30


def prepared_then_source_deleted(tmp_path: Path) -> tuple[list[str], Path]:
    """Prepare a copy of python-stdlib/json, then delete the copy; returns (--set values, data dir)."""
    corpus, data = tmp_path / "corpus", tmp_path / "data"
    shutil.copytree(STDLIB / "json", corpus, ignore=shutil.ignore_patterns("__pycache__"))
    sets = [f"data.source={corpus}", "data.vocab_size=300", f"data.dir={data}"]
    prepare(load_job(TINY, sets))
    shutil.rmtree(corpus)  # like a compute node that has only the prepared directory
    return sets, data


def test_loading_needs_only_the_prepared_directory(tmp_path):
    sets, data = prepared_then_source_deleted(tmp_path)
    job = load_job(TINY, sets)
    prepared = load_prepared(job)
    assert prepared.meta == json.loads((data / "meta.json").read_text())
    assert TokenReader(prepared.tokens("train"), 64, 8, 0).micro_batch(0, 0, 0, 8, 1)[0].shape == (8, 64)
    job.data.vocab_size = 320  # a job that does not fit the prepared tokens is refused
    with pytest.raises(ValueError, match="data.vocab_size is 300 there, 320 in the job; run: hvdllm prepare"):
        load_prepared(job)
    with pytest.raises(ValueError, match="matches no"):  # prepare does read the source
        prepare(job)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(ValueError, match="has format 1, this hvdllm reads format 3"):
        load_prepared(load_job(TINY, sets))


@pytest.mark.mpi  # hvdllm train initialises Horovod
def test_train_without_the_source_shows_val_loss_when_evaluated(tmp_path):
    sets, _ = prepared_then_source_deleted(tmp_path)
    p = run(hvdllm("train", TINY, *[a for s in sets for a in ("--set", s)], "--set",
                   f"run.dir={tmp_path / 'run'}", "--set", "training.steps=3",
                   "--set", "training.log_every=2", "--set", "training.eval_every=1"))
    lines = [line.partition("] ")[2] for line in p.stderr.splitlines()]
    assert any(line.startswith("step      1/3 | val loss ") and "| ppl " in line for line in lines)
    for step in (2, 3):  # a step with both: its training line, then its validation line
        i = next(i for i, line in enumerate(lines) if line.startswith(f"step      {step}/3 | loss "))
        assert lines[i + 1].startswith(f"step      {step}/3 | val loss "), lines[i:i + 2]
    bad = run(hvdllm("train", TINY, *[a for s in sets for a in ("--set", s)], "--set",
                     f"run.dir={tmp_path / 'bad'}", "--set", "data.val_fraction=0.2"), check=False)
    assert bad.returncode == 2 and "data.val_fraction is 0.1 there, 0.2 in the job" in bad.stderr


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


def test_the_launchers_world_size_under_srun_pmix():
    """srun --mpi=pmix sets PMIX_RANK but no size; the step's task count gives it."""
    from hvdllm.data.world import launcher_size

    assert launcher_size({"PMIX_RANK": "1", "SLURM_STEP_NUM_TASKS": "2"}) == 2
    assert launcher_size({"SLURM_STEP_NUM_TASKS": "2"}) == 1  # srun --mpi=none: no MPI world
    assert launcher_size({"OMPI_COMM_WORLD_SIZE": "4"}) == 4 and launcher_size({}) == 1
