"""The documentation cannot drift from the code: the configuration page is generated, and every
job key, `--set` override and `hvdllm <command>` the docs show must exist. Fast, no MPI."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from hvdllm.config import SECTIONS
from hvdllm.config_doc import render

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
REGENERATE = "python -m hvdllm.config_doc > docs/configuration.md"

# --set section.key=... in prose or code; upper-case placeholders (SECTION.KEY=VALUE) do not match
# and the lower-case placeholder `section.key=value` is allowed.
SET_RE = re.compile(r"--set[ =]+['\"]?([a-z_][a-z0-9_]*)\.([a-z_][a-z0-9_]*)=")
PLACEHOLDER = ("section", "key")
# `hvdllm <word>` inside code (fenced blocks and `spans`), also as .venv/bin/hvdllm <word>.
COMMAND_RE = re.compile(r"(?:^|[\s/(\"'`$])hvdllm[ \t]+([a-z][a-z0-9_-]*)", re.MULTILINE)
FENCE_RE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1[ \t]*$", re.MULTILINE | re.DOTALL)
SPAN_RE = re.compile(r"`([^`\n]+)`")


def valid_keys() -> set[tuple[str, str]]:
    return {(s, f.name) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def doc_texts() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in DOCS if p.is_file()}


def code_of(markdown: str) -> list[str]:
    """The code in a markdown page: fenced blocks, then inline spans of the prose around them."""
    blocks = [m.group(2) for m in FENCE_RE.finditer(markdown)]
    prose = FENCE_RE.sub("", markdown)
    return blocks + SPAN_RE.findall(prose)


def test_configuration_page_is_generated_from_config_py():
    page = ROOT / "docs" / "configuration.md"
    assert page.is_file(), f"docs/configuration.md is missing: run `{REGENERATE}`"
    assert page.read_text() == render(), (
        f"docs/configuration.md is out of date with hvdllm/config/schema.py: run `{REGENERATE}`")


def test_every_section_and_key_is_documented():
    page = render()
    for section, key in valid_keys():
        assert f"## [{section}]" in page and f"| `{key}` |" in page, f"{section}.{key}"


def test_job_files_use_real_keys():
    valid = valid_keys()
    jobs = sorted((ROOT / "jobs").glob("*.toml"))
    assert jobs
    for job in jobs:
        for section, values in tomllib.loads(job.read_text()).items():
            assert isinstance(values, dict), f"{job.name}: [{section}] is not a table"
            for key in values:
                assert (section, key) in valid, f"{job.name}: {section}.{key} is not a config key"


def test_set_overrides_in_docs_are_real_keys():
    valid, seen = valid_keys(), 0
    for name, text in doc_texts().items():
        for m in SET_RE.finditer(text):
            seen += (m.group(1), m.group(2)) != PLACEHOLDER
            line = text.count("\n", 0, m.start()) + 1
            assert (m.group(1), m.group(2)) in valid | {PLACEHOLDER}, (
                f"{name}:{line}: --set {m.group(1)}.{m.group(2)}= is not a config key")
    assert seen, "no --set section.key= found in README.md or docs/*.md"


def test_commands_in_docs_are_real_subcommands():
    from hvdllm.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    commands, seen = set(sub.choices), 0
    for name, text in doc_texts().items():
        for code in code_of(text):
            for m in COMMAND_RE.finditer(code):
                seen += 1
                assert m.group(1) in commands, (
                    f"{name}: `hvdllm {m.group(1)}` is not a command ({', '.join(sorted(commands))})")
    assert seen, "no `hvdllm <command>` found in README.md or docs/*.md"


@pytest.mark.parametrize("text, found", [
    ("run `hvdllm train jobs/tiny.toml --set training.steps=5`", ["train"]),
    ("```\nmpirun -np 2 .venv/bin/hvdllm prepare x\n# hvdllm <command>\n```", ["prepare"]),
    ("hvdllm trains models (prose, not code)", []),
])
def test_command_pattern(text, found):
    assert [m.group(1) for c in code_of(text) for m in COMMAND_RE.finditer(c)] == found
