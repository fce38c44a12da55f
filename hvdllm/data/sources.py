"""Where documents come from: the Python standard library, a directory or glob, or a .jsonl file."""

from __future__ import annotations

import glob
import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from hvdllm.errors import UserError

TEXT_SUFFIXES = (".txt", ".py", ".md")


@dataclass(frozen=True)
class Document:
    name: str
    """Stable identifier (path, or path:line for jsonl); used to split train/val."""
    text: str


def _stdlib_files(subdir: str = "") -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"], subdir)
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts
                  and "dist-packages" not in p.parts)


def source_files(source: str) -> list[Path]:
    """The files a source names, sorted; raises UserError with a clear message when none."""
    if source == "python-stdlib" or source.startswith("python-stdlib/"):
        files = _stdlib_files(source.partition("/")[2])
    elif Path(source).is_dir():
        files = sorted(p for p in Path(source).rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    elif source.endswith(".jsonl"):
        files = [Path(source)] if Path(source).is_file() else []
    else:
        files = sorted(Path(p) for p in glob.glob(source, recursive=True)
                       if Path(p).is_file() and Path(p).suffix in TEXT_SUFFIXES)
    if not files:
        raise UserError(f"data.source {source!r} matches no .txt/.py/.md/.jsonl files")
    return files


def fingerprint_files(files: list[Path]) -> str:
    """A cheap fingerprint of the inputs (path, size, mtime): changes when any input changes."""
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def iter_documents(files: list[Path]) -> Iterator[Document]:
    """Yield documents; undecodable bytes are replaced, empty documents skipped."""
    for path in files:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise UserError(f"{path}:{lineno}: expected a JSON object with a \"text\" field") from None
                    if text:
                        yield Document(f"{path}:{lineno}", str(text))
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield Document(str(path), text)
