"""Reading one corpus file as a stream of records, with the library made for its format.

| suffix                         | record                              | read with                   |
|--------------------------------|-------------------------------------|-----------------------------|
| .txt .py .md                   | the whole file                      | the standard library        |
| .jsonl .jsonl.gz .jsonl.zst    | one JSON object per line            | json, gzip, zstandard       |
| .parquet                       | one row (the text column)           | pyarrow.parquet, by batches |
| .arrow of a `save_to_disk` set | one row (the text column)           | datasets.Dataset.from_file  |

Every reader streams: it holds one line or one batch of rows at a time, never the file. A record
is named `<file name>:<n>` (n from 1: the line of a .jsonl file, the row of a table), which is
what the train/val split hashes. A record without the text field, or whose field is not a string,
comes back with `text=None` and the reason; the caller decides (error or skip). A file that cannot
be read at all (missing, truncated archive, not parquet) raises UserError naming it.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from hvdllm.errors import UserError

TEXT_SUFFIXES = (".txt", ".py", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TABLE_SUFFIXES = (".parquet",)
SUFFIXES = (*TEXT_SUFFIXES, *JSONL_SUFFIXES, *TABLE_SUFFIXES)
"""The suffixes a directory walk or a glob picks up (a saved dataset's .arrow files come from
its own manifest, not from the walk)."""

BATCH_ROWS = 1024
"""Rows read at a time from a parquet or arrow file."""


@dataclass(frozen=True)
class Record:
    name: str
    """`file` for a text file, `file:n` for the n-th line or row (from 1)."""
    text: str | None
    """The document, or None for a bad record."""
    problem: str = ""
    """Why the record is bad (empty when it is not)."""
    pos: int = 0
    """Bytes of the file on disk consumed once this record is read (for progress)."""


SKIP_HINT = "(data.on_bad_record = \"skip\" skips and counts such records)"


def bad_record(path: Path | str, rec: Record, skip: bool) -> str:
    """The one line for a bad record; raises UserError with it unless `skip`."""
    where = f"{path}: record {rec.name.rpartition(':')[2]}: {rec.problem}"
    if not skip:
        raise UserError(f"{where} {SKIP_HINT}")
    return where


def suffix_of(path: Path | str) -> str:
    """The reader suffix of a file name ('.jsonl.gz', '.parquet', ...), or '' for none."""
    name = Path(path).name
    return next((s for s in (*SUFFIXES, ".arrow") if name.endswith(s)), "")


def _unreadable(path: Path, e: Exception) -> UserError:
    why = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return UserError(f"{path}: cannot read this file ({why})")


def _text_records(path: Path, name: str, field: str) -> Iterator[Record]:
    """A text file is one document; undecodable bytes are replaced, blank files skipped."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _unreadable(path, e) from None
    text = data.decode("utf-8", errors="replace")
    if text.strip():
        yield Record(name, text, pos=len(data))


def _open_lines(path: Path, raw: io.BufferedReader) -> io.TextIOWrapper:
    """Text lines of a .jsonl file, decompressed by gzip or zstandard as its suffix says."""
    stream: io.RawIOBase | io.BufferedIOBase = raw
    if path.name.endswith(".gz"):
        stream = gzip.GzipFile(fileobj=raw)
    elif path.name.endswith(".zst"):
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return io.TextIOWrapper(stream, encoding="utf-8", errors="replace")


def _json_text(line: str, field: str) -> tuple[str | None, str]:
    """(text, problem) of one JSON line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    if field not in obj:
        return None, f"no {field!r} field"
    if not isinstance(obj[field], str):
        return None, f"the {field!r} field is {type(obj[field]).__name__}, not a string"
    return obj[field], ""


def _jsonl_records(path: Path, name: str, field: str) -> Iterator[Record]:
    """One record per non-blank line; empty texts are skipped."""
    try:
        raw = path.open("rb")
    except OSError as e:
        raise _unreadable(path, e) from None
    with raw, _open_lines(path, raw) as lines:
        lineno = 0
        while True:
            try:
                line = lines.readline()
            except (OSError, EOFError, ValueError) as e:  # truncated or corrupt archive
                raise _unreadable(path, e) from None
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            text, problem = _json_text(line, field)
            if text != "":
                yield Record(f"{name}:{lineno}", text, problem, raw.tell())


def _column_records(batches: Iterator, rows: int, size: int, name: str,
                    field: str) -> Iterator[Record]:
    """Records of a table's text column, batch by batch; pos grows with the rows read."""
    row = 0
    for batch in batches:
        values = batch.column(field).to_pylist()
        for value in values:
            row += 1
            pos = size * row // max(rows, 1)
            if value is None:
                yield Record(f"{name}:{row}", None, f"the {field!r} field is null", pos)
            elif value:
                yield Record(f"{name}:{row}", value, "", pos)


def _check_string_column(path: Path, schema, field: str) -> None:
    """A missing or non-string text column is the whole file's problem: one line naming it."""
    import pyarrow as pa

    if field not in schema.names:
        raise UserError(f"{path}: record 1: no {field!r} column (columns: {', '.join(schema.names)})")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind)):
        raise UserError(f"{path}: record 1: the {field!r} column is {kind}, not a string")


def _parquet_records(path: Path, name: str, field: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise _unreadable(path, e) from None
    _check_string_column(path, pf.schema_arrow, field)
    batches = pf.iter_batches(batch_size=BATCH_ROWS, columns=[field])
    yield from _column_records(batches, pf.metadata.num_rows, path.stat().st_size, name, field)


def _arrow_records(path: Path, name: str, field: str) -> Iterator[Record]:
    """One .arrow file of a dataset saved with `datasets.save_to_disk` (memory-mapped)."""
    import pyarrow as pa
    from datasets import Dataset

    try:
        ds = Dataset.from_file(str(path))
    except (OSError, ValueError, pa.ArrowException) as e:
        raise _unreadable(path, e) from None
    _check_string_column(path, ds.data.schema, field)
    batches = ds.select_columns([field]).with_format("arrow").iter(batch_size=BATCH_ROWS)
    yield from _column_records(batches, ds.num_rows, path.stat().st_size, name, field)


READERS: dict[str, Callable[[Path, str, str], Iterator[Record]]] = {
    **{s: _text_records for s in TEXT_SUFFIXES}, **{s: _jsonl_records for s in JSONL_SUFFIXES},
    ".parquet": _parquet_records, ".arrow": _arrow_records}
"""Reader suffix -> the function yielding (path, document name, text field)'s records."""


def read_records(path: Path, name: str, field: str = "text") -> Iterator[Record]:
    """The records of one file, in order (see the table above)."""
    return READERS[suffix_of(path)](path, name, field)
