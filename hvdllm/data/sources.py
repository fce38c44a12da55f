"""Where documents come from: the Python standard library, directories, globs, corpus files.

A source resolves to a root directory and a sorted list of files: text files, .jsonl (also
.gz and .zst), .parquet, and the .arrow files of a Hugging Face dataset saved with
`save_to_disk` (a directory holding state.json or dataset_dict.json; nothing is fetched from a
hub). hvdllm.data.formats reads each file as records. A document's name is its path relative to
the root (plus `:n` for the n-th record of a file), so the train/val split, which hashes the
name, does not depend on where the corpus is mounted. New formats go in formats.py.

`plan_units` groups the files, in order, into work units: the pieces that workers and ranks
tokenize independently, and that an interrupted `prepare` keeps.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterator

from hvdllm.data.formats import SUFFIXES, read_records, suffix_of
from hvdllm.errors import UserError

DATASET_MANIFESTS = ("state.json", "dataset_dict.json")
"""A directory holding one of these is a dataset saved with `datasets.save_to_disk`."""

STDLIB_SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__",  # installed packages, bytecode
    "test", "tests", "idle_test",                     # test suites: 18 MB, mostly fixtures
    "encodings",                                      # generated codec tables
    "idlelib",                                        # the IDLE application
    "pydoc_data",                                     # topics.py: 0.8 MB of help text in one string
})
"""Directories left out of `python-stdlib` (at any depth below the named package)."""

STDLIB_SKIP_FILES = ("html/entities.py", "stringprep.py", "re/_casefix.py", "_sysconfigdata_*.py")
"""Generated tables left out of `python-stdlib` (paths relative to the standard library)."""


@dataclass(frozen=True)
class Document:
    name: str
    """Stable identifier (path relative to the source's root, plus :line for jsonl); splits train/val."""
    text: str


@dataclass(frozen=True)
class Source:
    """The files a `data.source` names, and the directory their document names are relative to."""
    root: Path
    files: tuple[Path, ...]

    def name_of(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.root)).as_posix()


def _dataset_files(top: Path) -> list[Path]:
    """The .arrow files of a dataset saved with `datasets.save_to_disk` (every split of a
    DatasetDict), as its own manifest lists them; loaded from local files only."""
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(top))
    except Exception as e:  # datasets raises many kinds for a damaged folder
        raise UserError(f"{top}: cannot read this saved dataset ({e})") from None
    caches = ds.cache_files.values() if isinstance(ds.cache_files, dict) else [ds.cache_files]
    return [Path(c["filename"]) for files in caches for c in files]


def is_dataset_dir(path: Path) -> bool:
    return any((path / m).is_file() for m in DATASET_MANIFESTS)


def _walk(top: Path, skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """Every file under top with a known suffix, not descending into skip_dirs; sorted. A saved
    dataset below top contributes its .arrow files."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        if is_dataset_dir(Path(dirpath)):
            found += _dataset_files(Path(dirpath))
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]
        found += [Path(dirpath, f) for f in filenames if suffix_of(f) in SUFFIXES]
    return sorted(found)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_source(subdir: str) -> Source:
    """`python-stdlib[/pkg]`: the .py files of this interpreter's standard library.

    The exclusions apply below the named package, so `python-stdlib/encodings` takes that
    package whole while `python-stdlib/unittest` leaves out unittest/test.
    """
    root = stdlib_root()
    files = [p for p in _walk(root / subdir, STDLIB_SKIP_DIRS) if p.suffix == ".py"
             and not any(fnmatch(p.relative_to(root).as_posix(), pat) for pat in STDLIB_SKIP_FILES)]
    return Source(root, tuple(files))


def _glob_root(pattern: str) -> Path:
    """The leading directories of a glob that hold no wildcard (names are relative to them)."""
    fixed = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    root = Path(*fixed) if fixed else Path(".")
    return root if root.is_dir() else root.parent


def resolve_source(source: str) -> Source:
    """The files a source names, sorted; raises UserError with a clear message when none."""
    if source == "python-stdlib" or source.startswith("python-stdlib/"):
        found = _stdlib_source(source.partition("/")[2])
    elif Path(source).is_dir():
        found = Source(Path(source), tuple(_walk(Path(source))))
    else:
        files = sorted(Path(p) for p in glob.glob(source, recursive=True)
                       if Path(p).is_file() and suffix_of(p) in SUFFIXES)
        found = Source(_glob_root(source), tuple(files))
    if not found.files:
        raise UserError(f"data.source {source!r} matches no corpus files "
                        f"({'/'.join(SUFFIXES)} or a saved dataset)")
    return found


def source_files(source: str) -> list[Path]:
    """The files a source names, sorted (see resolve_source)."""
    return list(resolve_source(source).files)


def fingerprint_files(source: Source) -> str:
    """A cheap fingerprint of the inputs (name relative to the root, size, mtime): changes when
    any input changes, not when the corpus is mounted elsewhere."""
    h = hashlib.sha256()
    for p in source.files:
        st = p.stat()
        h.update(f"{source.name_of(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def iter_documents(source: Source, field: str = "text") -> Iterator[Document]:
    """Yield the source's documents in file order (empty ones skipped; a bad record raises)."""
    for path in source.files:
        for rec in read_records(path, source.name_of(path), field):
            if rec.text is None:
                raise UserError(f"{path}: record {rec.name.rpartition(':')[2]}: {rec.problem}")
            yield Document(rec.name, rec.text)


@dataclass(frozen=True)
class Unit:
    """Consecutive files tokenized together: by one worker, on one rank, into their own shards."""
    index: int
    files: tuple[Path, ...]
    names: tuple[str, ...]
    bytes: int


def plan_units(source: Source, unit_bytes: int) -> list[Unit]:
    """Group the files, in order, into units of at least unit_bytes on disk (the last may be
    smaller; a larger file is a unit alone). Depends only on the source, never on the number of
    workers or ranks, so every layout writes the same shards."""
    units: list[Unit] = []
    files: list[Path] = []
    size = 0
    for path in source.files:
        files.append(path)
        size += path.stat().st_size
        if size >= unit_bytes:
            units.append(Unit(len(units), tuple(files), tuple(map(source.name_of, files)), size))
            files, size = [], 0
    if files:
        units.append(Unit(len(units), tuple(files), tuple(map(source.name_of, files)), size))
    return units
