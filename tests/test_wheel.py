"""hvdllm installed from its wheel, away from the source tree: `hvdllm slurm` renders from the
templates shipped as package data.

The wheel is built offline from a copy of the package's files (the checkout stays untouched),
installed with --no-deps into a fresh virtual environment (`hvdllm slurm` needs only the standard
library), and run from a directory outside the checkout. Every step has its own timeout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import BIN, ROOT

pytestmark = pytest.mark.slurm
BUILD_FILES = ("hvdllm", "setup.cfg", "pyproject.toml", "README.md")
"""What building the wheel reads (README.md is the long description)."""
STEP_TIMEOUT_S = 180
JOB = ROOT / "jobs" / "gpt2-124m.toml"
SLURM_ARGS = ["slurm", str(JOB), "--nodes", "2", "--tasks-per-node", "8", "--gpus-per-node", "8"]


def step(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    """Run one step without the checkout on the path; its output in the assertion if it fails."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")}
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env,
                       timeout=STEP_TIMEOUT_S)
    assert p.returncode == 0, (f"{' '.join(map(str, cmd))} exited {p.returncode}\n"
                               f"--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}")
    return p


def copy_build_files(dest: Path) -> Path:
    """The files the build reads, copied (no caches, no egg-info): the build writes only there."""
    for name in BUILD_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(source, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    source = copy_build_files(base / "source")
    step([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--quiet", "--wheel-dir", base / "dist", source], cwd=base)
    wheels = list((base / "dist").glob("hvdllm-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with only the wheel installed (no torch, no Horovod)."""
    env_dir = tmp_path_factory.mktemp("venv") / "venv"
    step([sys.executable, "-m", "venv", env_dir], cwd=env_dir.parent)
    step([env_dir / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
          wheel], cwd=env_dir.parent)
    return env_dir


def test_wheel_ships_every_template(wheel):
    shipped = set(zipfile.ZipFile(wheel).namelist())
    templates = sorted((ROOT / "hvdllm" / "launch" / "templates").iterdir())
    assert templates and all(f"hvdllm/launch/templates/{t.name}" in shipped for t in templates), (
        "a template is missing from the wheel: declare it in setup.cfg [options.package_data]")


def test_installed_wheel_renders_outside_the_source_tree(venv, tmp_path):
    where = step([venv / "bin" / "python", "-c",
                  "import hvdllm.launch.slurm as s; print(s.__file__); print(s.TEMPLATES)"],
                 cwd=tmp_path).stdout
    assert str(ROOT) not in where and str(venv) in where, where  # the installed copy, not ours
    installed = step([venv / "bin" / "hvdllm", *SLURM_ARGS], cwd=tmp_path).stdout
    assert installed.startswith("#!/bin/bash\n") and "{{" not in installed
    assert "#SBATCH --nodes=2\n" in installed and "#SBATCH --gpus-per-node=8\n" in installed
    assert f"\nhvdllm={venv}/bin/hvdllm\n" in installed  # this installation's command
    from_checkout = step([BIN / "hvdllm", *SLURM_ARGS], cwd=tmp_path).stdout
    assert installed == from_checkout.replace(str(BIN), str(venv / "bin"))
