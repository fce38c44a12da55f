"""Every source format (files the tests write), text fields, bad records and unreadable files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import TINY, hvdllm, run
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer

from hvdllm.config import load_job
from hvdllm.data import prepare, read_prepared
from hvdllm.data.sources import iter_documents, resolve_source
from hvdllm.errors import UserError


def texts(tag: str, n: int) -> list[str]:
    return [f"{tag} document {i}: " + "words in a row " * (5 + i % 7) for i in range(n)]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def write_corpus(root: Path, field: str = "text") -> dict[str, list[str]]:
    """One file of every format; returns each file's texts (dataset split dirs: by split)."""
    root.mkdir(parents=True)
    made = {name: texts(name, 12) for name in
            ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet", "e.txt", "ds/train", "ds/test")}
    (root / "a.jsonl").write_bytes(jsonl([{field: t} for t in made["a.jsonl"]]))
    (root / "b.jsonl.gz").write_bytes(gzip.compress(jsonl([{field: t} for t in made["b.jsonl.gz"]])))
    (root / "c.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(jsonl([{field: t, "id": 1} for t in made["c.jsonl.zst"]])))
    pq.write_table(pa.table({field: made["d.parquet"], "n": list(range(12))}), root / "d.parquet",
                   row_group_size=5)
    (root / "e.txt").write_text(made["e.txt"][0])
    made["e.txt"] = made["e.txt"][:1]
    DatasetDict({s: Dataset.from_dict({field: made[f"ds/{s}"]}) for s in ("train", "test")}
                ).save_to_disk(str(root / "ds"))
    return made


def test_every_format_streams_its_documents(tmp_path):
    made = write_corpus(tmp_path / "corpus")
    source = resolve_source(str(tmp_path / "corpus"))
    names = [source.name_of(f) for f in source.files]
    assert names[:5] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet"] + names[4:5]
    assert any(n.startswith("ds/train/") and n.endswith(".arrow") for n in names)
    assert any(n.startswith("ds/test/") for n in names) and names[-1] == "e.txt"
    docs = list(iter_documents(source))
    by_file = {}
    for d in docs:
        by_file.setdefault(d.name.rsplit(":", 1)[0] if ":" in d.name else d.name, []).append(d)
    assert [d.text for d in by_file["a.jsonl"]] == made["a.jsonl"]
    assert [d.name for d in by_file["d.parquet"]][:2] == ["d.parquet:1", "d.parquet:2"]
    for name, want in made.items():
        got = [d.text for f, ds in by_file.items() if f == name or f.startswith(name + "/") for d in ds]
        assert got == want, name
    # Prepared tokens decode back to every document, in file order, split by document.
    job = load_job(TINY, [f"data.source={tmp_path / 'corpus'}", f"data.dir={tmp_path / 'data'}",
                          "data.vocab_size=300", "data.val_fraction=0.3"])
    meta = prepare(job).meta
    assert meta["train"]["documents"] + meta["val"]["documents"] == len(docs) == 73
    tok = Tokenizer.from_file(str(tmp_path / "data" / "tokenizer" / "tokenizer.json"))
    prepared = read_prepared(tmp_path / "data")
    decoded = []
    for split in ("train", "val"):
        ids = np.asarray(prepared.tokens(split))
        cuts = np.flatnonzero(ids == meta["eos_token_id"])
        decoded += [tok.decode(part.tolist()) for part in np.split(ids, cuts + 1)[:-1]]
    assert sorted(decoded) == sorted(d.text for d in docs)


def test_text_field_names_the_column(tmp_path):
    write_corpus(tmp_path / "corpus", field="content")
    job = load_job(TINY, [f"data.source={tmp_path / 'corpus'}", f"data.dir={tmp_path / 'data'}",
                          "data.vocab_size=300", "data.text_field=content"])
    meta = prepare(job).meta
    assert meta["train"]["documents"] + meta["val"]["documents"] == 73
    job.data.text_field = "text"
    with pytest.raises(UserError, match=r"a\.jsonl: record 1: no 'text' field"):
        prepare(job)


BAD_FILES = [  # (file name, bytes or a writer, the expected one line)
    ("x.jsonl", jsonl([{"text": "fine " * 9}, {"text": "ok " * 9}, {"txt": "no field"}]),
     "x.jsonl: record 3: no 'text' field"),
    ("x.jsonl.gz", gzip.compress(jsonl([{"text": "fine " * 9}, {"text": 7}])),
     "x.jsonl.gz: record 2: the 'text' field is int, not a string"),
    ("x.jsonl.zst", zstandard.ZstdCompressor().compress(b'{"text": "a b c"}\n["not", "an object"]\n'),
     "x.jsonl.zst: record 2: expected a JSON object, got list"),
    ("x.jsonl", b'{"text": "fine"}\n{"text": \n', "x.jsonl: record 2: not valid JSON"),
    ("x.jsonl.gz", gzip.compress(jsonl([{"text": "fine " * 999}] * 40))[:300],
     "x.jsonl.gz: cannot read this file"),
    ("x.parquet", b"PAR1 this is not parquet", "x.parquet: cannot read this file"),
]


@pytest.mark.parametrize("name,data,line", BAD_FILES, ids=[b[2].split(": ", 1)[1][:24] for b in BAD_FILES])
def test_bad_records_and_unreadable_files_are_one_line(tmp_path, name, data, line):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "good.jsonl").write_bytes(jsonl([{"text": "good " * 20}] * 4))
    (tmp_path / "c" / name).write_bytes(data)
    job = load_job(TINY, [f"data.source={tmp_path / 'c'}", f"data.dir={tmp_path / 'd'}",
                          "data.vocab_size=300"])
    with pytest.raises(UserError) as e:
        prepare(job)
    assert line in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "d" / "meta.json").exists()


def test_bad_table_rows_and_columns(tmp_path):
    (tmp_path / "c").mkdir()
    pq.write_table(pa.table({"text": ["a " * 30, None, "b " * 30]}), tmp_path / "c" / "nulls.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "c" / "ints.parquet")
    sets = [f"data.dir={tmp_path / 'd'}", "data.vocab_size=300"]
    with pytest.raises(UserError, match=r"ints\.parquet: record 1: the 'text' column is int64"):
        prepare(load_job(TINY, [f"data.source={tmp_path / 'c'}", *sets]))
    job = load_job(TINY, [f"data.source={tmp_path / 'c' / 'nulls.parquet'}", *sets])
    with pytest.raises(UserError, match=r"nulls\.parquet: record 2: the 'text' field is null"):
        prepare(job)


def test_skip_counts_bad_records_and_the_cli_exits_2_otherwise(tmp_path):
    src = tmp_path / "c.jsonl"
    rows = [{"text": f"line {i} " * 20} for i in range(10)]
    rows[3], rows[7] = {"body": "x"}, {"text": None}
    src.write_bytes(jsonl(rows))
    sets = [f"data.source={src}", "data.vocab_size=300"]
    meta = prepare(load_job(TINY, [*sets, f"data.dir={tmp_path / 'd'}", "data.on_bad_record=skip"])).meta
    assert meta["skipped"]["records"] == 2 and "c.jsonl: record 4: no 'text' field" in meta["skipped"]["first"]
    assert meta["train"]["documents"] + meta["val"]["documents"] == 8
    p = run(hvdllm("prepare", TINY, *[a for s in sets for a in ("--set", s)], "--set",
                   f"data.dir={tmp_path / 'e'}"), check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (
        f"hvdllm prepare: error: {src}: record 4: no 'text' field "
        "(data.on_bad_record = \"skip\" skips and counts such records)")
