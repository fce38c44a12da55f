"""Where documents come from: the Python standard library, a directory, a glob, or .jsonl files.

A source resolves to a root directory and a sorted list of files. Each file is read by the
reader for its suffix (`READERS`): a text file is one document, a .jsonl file one document per
line. A document's name is its path relative to the root (plus `:line` for .jsonl), so the
train/val split, which hashes the name, does not depend on where the corpus lies. New formats
go here: add a reader and its suffix.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable, Iterator

from hvdllm.errors import UserError

TEXT_SUFFIXES = (".txt", ".py", ".md")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl")

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


def _walk(top: Path, skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """Every file under top with a known suffix, not descending into skip_dirs; sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]
        found += [Path(dirpath, f) for f in filenames if Path(f).suffix in SUFFIXES]
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
                       if Path(p).is_file() and Path(p).suffix in SUFFIXES)
        found = Source(_glob_root(source), tuple(files))
    if not found.files:
        raise UserError(f"data.source {source!r} matches no .txt/.py/.md/.jsonl files")
    return found


def source_files(source: str) -> list[Path]:
    """The files a source names, sorted (see resolve_source)."""
    return list(resolve_source(source).files)


def fingerprint_files(files: list[Path] | tuple[Path, ...]) -> str:
    """A cheap fingerprint of the inputs (path, size, mtime): changes when any input changes."""
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _text_documents(path: Path, name: str) -> Iterator[Document]:
    """A text file is one document; undecodable bytes are replaced, blank files skipped."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.strip():
        yield Document(name, text)


def _jsonl_documents(path: Path, name: str) -> Iterator[Document]:
    """One document per non-empty line, from its "text" field; a bad line is a UserError."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{lineno}: expected a JSON object with a \"text\" field") from None
            if text:
                yield Document(f"{name}:{lineno}", str(text))


READERS: dict[str, Callable[[Path, str], Iterator[Document]]] = {
    ".jsonl": _jsonl_documents, **{suffix: _text_documents for suffix in TEXT_SUFFIXES}}
"""File suffix -> the function that yields its documents."""


def iter_documents(source: Source) -> Iterator[Document]:
    """Yield the source's documents in file order (empty documents skipped)."""
    for path in source.files:
        yield from READERS[path.suffix](path, source.name_of(path))
