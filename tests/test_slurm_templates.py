"""The sbatch templates as package data: common.sbatch plus one <launcher>.part each, and the
rendered scripts the repository shows (slurm/*.sbatch, docs/slurm.md) equal to a fresh render.
Fast: no Slurm, no MPI."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import hvdllm.launch.slurm as slurm
from conftest import TINY
from hvdllm.config import ConfigError, load_job
from hvdllm.launch.slurm import COMMON, LAUNCHERS, TEMPLATES, parse_parts, placeholders, render
from slurm_examples import CHECKOUT, DOCS_EXAMPLE, EXAMPLES, RECIPES, ROOT, SLURM_DIR, render_shown

REWRITE = "run `.venv/bin/python tests/slurm_examples.py`"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_in_slurm_folder_equal_a_fresh_render(name):
    path = SLURM_DIR / name
    assert path.is_file(), f"slurm/{name} is missing: {REWRITE}"
    assert path.read_text() == render_shown(EXAMPLES[name]), (
        f"slurm/{name} is out of date: {REWRITE}")


def test_slurm_folder_holds_the_readme_the_examples_and_the_recipes_only():
    """No stale template copies: the templates live in the package (hvdllm/launch/templates)."""
    assert {p.name for p in SLURM_DIR.iterdir()} == {"README.md", *EXAMPLES, *RECIPES}
    readme = (SLURM_DIR / "README.md").read_text()
    for name, arguments in EXAMPLES.items():
        assert f"hvdllm slurm {arguments} -o slurm/{name}" in readme, name
    for name in RECIPES:
        assert f"`{name}`" in readme, name


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck missing")
@pytest.mark.parametrize("name", RECIPES)
def test_recipes_pass_shellcheck(name):
    path = SLURM_DIR / name
    assert os.access(path, os.X_OK) or name.endswith(".sbatch"), f"slurm/{name} is not executable"
    subprocess.run(["shellcheck", "--shell=bash", str(path)], check=True)


def test_docs_show_the_rendered_script():
    """docs/slurm.md's example is what `hvdllm slurm` renders today (in a checkout at ~you)."""
    shown = re.search(r"```bash\n(#!/bin/bash\n.*?)```", (ROOT / "docs" / "slurm.md").read_text(),
                      re.DOTALL)[1]
    assert shown == render_shown(DOCS_EXAMPLE), (
        f"docs/slurm.md is out of date: paste the output of `hvdllm slurm {DOCS_EXAMPLE}` "
        f"(paths as {CHECKOUT})")


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_launcher_fills_every_part_of_the_common_template(tmp_path, launcher):
    common = (TEMPLATES / COMMON).read_text()
    parts = parse_parts((TEMPLATES / f"{launcher}.part").read_text(), launcher)
    job = load_job(TINY, [])
    job.slurm.launcher = launcher
    values = slurm.template_values(job, TINY, [], tmp_path)
    assert set(parts) == placeholders(common) - set(values) and parts.keys().isdisjoint(values)
    assert "{{" not in render(job, TINY, workdir=tmp_path)


def test_parts_go_in_whole_and_values_are_not_read_as_placeholders(tmp_path):
    text = render(load_job(TINY, ["run.name={{launch}}"]), TINY, workdir=tmp_path)
    assert "#SBATCH --job-name=\"{{launch}}\"\n" in text  # a value's braces stay text
    assert "\nstart_train() { srun --mpi=pmix --kill-on-bad-exit=0 \"${rank[@]}\" & }\n" in text
    assert "\nrun_step start_prepare\n" in text and "\n    run_step start_train\n" in text


def test_parse_parts_ignores_the_description_and_keeps_lines():
    parts = parse_parts("about {{x}}\n#@ one\na\n\n  b\n#@ two\n#@ three\nc\n", "t.part")
    assert parts == {"one": "a\n\n  b", "two": "", "three": "c"}


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("#@ launch\n", "#@ launch_it\n"),
     "missing: launch; unknown: launch_it"),
    (lambda t: t + "#@ summary\n# again\n", "part 'summary' is defined twice"),
    (lambda t: t.replace("#@ notes\n", "#@ notes\n{{not_a_value}}\n"),
     "unknown or malformed placeholder 'not_a_value'"),
])
def test_broken_templates_are_one_line_errors(tmp_path, monkeypatch, edit, message):
    copy = tmp_path / "templates"
    shutil.copytree(Path(str(TEMPLATES)), copy)
    (copy / "srun.part").write_text(edit((copy / "srun.part").read_text()))
    monkeypatch.setattr(slurm, "TEMPLATES", copy)
    with pytest.raises(ConfigError) as e:
        render(load_job(TINY, []), TINY, workdir=tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_missing_template_says_to_reinstall(tmp_path, monkeypatch):
    monkeypatch.setattr(slurm, "TEMPLATES", tmp_path)
    with pytest.raises(ConfigError, match="installed without its package data; reinstall"):
        render(load_job(TINY, []), TINY, workdir=tmp_path)
