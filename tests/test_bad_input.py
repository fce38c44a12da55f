"""Bad input ends in one line on stderr and exit status 2, and nothing of a run is lost.

One table of inputs a user can get wrong (job files, run directories, checkpoints, pretrained
folders, export targets); grow it when a new one is found. Each row runs the real CLI in one
process (Horovod is initialised by `hvdllm train` with one rank).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, TINY, hvdllm, run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run(hvdllm("train", TINY, "--set", f"data.dir={tiny_data}", "--set", f"run.dir={run_dir}",
               "--set", "training.steps=4", "--set", "training.checkpoint_every=2"))
    return run_dir


def copy_run(trained: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(trained, dest)
    return dest


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def replace_with_pickle(ckpt: Path, name: str) -> None:
    """A shard that unpickles to more than tensors (a class reference), its checksum updated
    so that only weights_only loading stands between it and being run."""
    data = pickle.dumps({"model": Path("x")})  # pathlib.PosixPath: not on the allow-list
    (ckpt / name).write_bytes(data)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["shards"][name].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (ckpt / "meta.json").write_text(json.dumps(meta))


def job_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "job.toml"
    path.write_bytes(data)
    return path


def pretrained(tmp_path: Path, tiny_args, config: bytes) -> list:
    """train arguments for a model.pretrained folder whose config.json holds `config`."""
    folder = tmp_path / "pretrained"
    folder.mkdir()
    (folder / "config.json").write_bytes(config)
    return ["train", TINY, *tiny_args("p"), "--set", f"model.pretrained={folder}"]


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


# name -> (arguments builder(tmp_path, tiny_args, trained), expected words in the one line)
CASES = {
    "job file not UTF-8": (
        lambda t, a, r: ["config", job_file(t, b"[run]\nname = \"\xff\xfe\"\n")], "not UTF-8 text"),
    "job file is a folder": (lambda t, a, r: ["config", t], "cannot be read"),
    "steps no run could reach": (
        lambda t, a, r: ["config", TINY, "--set", "training.steps=1000000000"],
        "training.steps = 1000000000 is over 99,999,999"),
    "run.dir is a file": (
        lambda t, a, r: ["train", TINY, *a("f"), "--set", f"run.dir={TINY}"], "is a file, not a directory"),
    "pretrained config.json not a model config": (
        lambda t, a, r: pretrained(t, a, b'{"hidden": 3}'), 'is not a model config (no "model_type")'),
    "pretrained config.json not JSON": (
        lambda t, a, r: pretrained(t, a, b"{"), "is not a JSON model config"),
    "pretrained family not supported": (
        lambda t, a, r: pretrained(t, a, b'{"model_type": "bert"}'), "model type 'bert' is not supported"),
    "resume from a truncated shard": (
        lambda t, a, r: (truncate(ckpt(c := copy_run(r, t), 4) / "model_stage0.pt"),
                         ["train", TINY, *a("r"), "--resume", ckpt(c, 4)])[1],
        "model_stage0.pt has"),
    "resume from a pickle that is not plain tensors": (
        lambda t, a, r: (replace_with_pickle(ckpt(c := copy_run(r, t), 4), "model_stage0.pt"),
                         ["train", TINY, *a("r"), "--resume", ckpt(c, 4)])[1],
        "holds more than plain tensors and is refused"),
    "resume from a checkpoint whose meta.json is damaged": (
        lambda t, a, r: ((ckpt(c := copy_run(r, t), 4) / "meta.json").write_text("{"),
                         ["train", TINY, *a("r"), "--resume", ckpt(c, 4)])[1],
        "meta.json cannot be read"),
    "resume with no checkpoint": (lambda t, a, r: ["train", TINY, *a("none"), "--resume"],
                                  "--resume: no checkpoint in"),
    "--fresh and --resume together": (
        lambda t, a, r: ["train", TINY, *a("x"), "--fresh", "--resume"], "choose one"),
    "a new run in a run directory that holds one": (
        lambda t, a, r: ["train", TINY, *a("x"), "--set", f"run.dir={copy_run(r, t)}"],
        "already holds a run"),
    "export of a damaged checkpoint": (
        lambda t, a, r: (truncate(ckpt(c := copy_run(r, t), 4) / "model_stage0.pt"),
                         ["export", ckpt(c, 4), t / "out"])[1], "cut short or replaced"),
    "export into a folder of other files": (
        lambda t, a, r: ((t / "busy").mkdir(), (t / "busy" / "notes.txt").write_text("mine"),
                         ["export", r, t / "busy"])[2], "is not empty and is not an earlier export"),
    "bench over a link that is not a tc rate": (
        lambda t, a, r: ["bench", TINY, "--hosts", "2", "--links", "fast", "--out", t / "b"],
        "--links: not a tc rate: 'fast'"),
    "bench over one host": (
        lambda t, a, r: ["bench", TINY, "--hosts", "1", "--out", t / "b"], "at least 2 hosts"),
    "plan on a cluster that is neither a preset nor a file": (
        lambda t, a, r: ["plan", TINY, "--gpus-per-node", "2", "--cluster", "nosuch"],
        "neither a preset"),
    "plan on a cluster file that is not one": (
        lambda t, a, r: ["plan", TINY, "--gpus-per-node", "2", "--cluster", job_file(t, b"{}")],
        "not a cluster description written by hvdllm calibrate"),
    "plan with more GPUs per node than the preset has": (
        lambda t, a, r: ["plan", TINY, "--gpus-per-node", "16", "--cluster", "h100-80g-8x-ib400"],
        "preset has 8 GPUs per node"),
    "plan of a batch that no layout splits": (
        lambda t, a, r: ["plan", TINY, "--gpus-per-node", "3", "--cluster", "h100-80g-8x-ib400"],
        "has no split over them"),
    "plan of a job that fits no layout": (
        lambda t, a, r: ["plan", ROOT / "jobs" / "llama-7b.toml", "--gpus-per-node", "1",
                         "--cluster", "l40s-48g-4x-eth100"], "no layout fits 40.2 GiB per rank"),
    "export into a checkpoint": (
        lambda t, a, r: ["export", r, ckpt(copy_run(r, t), 2) / "hf"], "inside a run's checkpoints/"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, tiny_args, trained):
    build, expected = CASES[case]
    p = run(hvdllm(*build(tmp_path, tiny_args, trained)), check=False, timeout=180)
    # Progress logged before the failure may precede it; the failure itself is one line.
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert expected in errors[0], errors[0]
