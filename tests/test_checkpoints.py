"""Checkpoints: checksummed shards, fallback to the newest good one agreed by every rank, runs
that never mix in one run directory, and exports that never mix with other files."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from conftest import TINY, hvdllm, mpirun, read_metrics, run, train_losses

from hvdllm.checkpoint import Checkpoint, CheckpointError

P2 = ("model.n_layer=4", "parallel.pipeline_stages=2", "training.log_every=1",
      "training.checkpoint_every=2")


def step_dir(run_dir, step: int):
    return run_dir / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_data):
    """4 steps on 2 stages, checkpoints at 2 and 4 (keep 2)."""
    run_dir = tmp_path_factory.mktemp("p2") / "run"
    sets = [f"data.dir={tiny_data}", f"run.dir={run_dir}", *P2, "training.steps=4"]
    mpirun(2, hvdllm("train", TINY, *[a for s in sets for a in ("--set", s)]), timeout=300)
    return run_dir


def test_every_shard_has_its_checksum_and_names(pipeline_run):
    ckpt = Checkpoint(step_dir(pipeline_run, 4))
    shards = ckpt.meta["shards"]
    assert sorted(shards) == ["model_stage0.pt", "model_stage1.pt", "optim_stage0.pt",
                              "optim_stage1.pt", "train.pt"]
    for name, entry in shards.items():
        data = (ckpt.path / name).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert "transformer.wte.weight" in shards["model_stage0.pt"]["names"]
    assert "lm_head.weight" in shards["model_stage1.pt"]["names"]


def test_a_rank_reads_only_the_shards_holding_its_names(pipeline_run, tmp_path):
    copy = tmp_path / "ck"
    shutil.copytree(step_dir(pipeline_run, 4), copy)
    (copy / "model_stage1.pt").unlink()  # stage 0's names are all in model_stage0.pt
    state = Checkpoint(copy).load_named("model", ["transformer.h.0.attn.c_attn.weight"], {})
    assert "transformer.h.0.attn.c_attn.weight" in state and "lm_head.weight" not in state
    with pytest.raises(CheckpointError, match="model_stage1.pt cannot be read"):
        Checkpoint(copy).load_named("model", ["transformer.h.3.mlp.c_fc.weight"], {})


def test_damaged_last_checkpoint_falls_back_on_every_rank(pipeline_run, tmp_path, tiny_args):
    """Only stage 1 reads model_stage1.pt; when it is damaged both ranks agree to resume from
    the older checkpoint, and training continues exactly as the original run did."""
    run_dir = tmp_path / "run"
    shutil.copytree(pipeline_run, run_dir)
    shard = step_dir(run_dir, 4) / "model_stage1.pt"
    shard.write_bytes(shard.read_bytes()[:-100])  # a save cut short
    p = mpirun(2, hvdllm("train", TINY, *tiny_args("run", *P2, "training.steps=4"), "--resume"),
               timeout=300)
    assert "skipping checkpoint" in p.stderr and "resumed from" in p.stderr
    assert "step_00000002 (step 2" in p.stderr
    original, again = train_losses(pipeline_run), train_losses(run_dir)
    assert sorted(again) == [1, 2, 3, 4] and all(again[s] == original[s] for s in again)


def test_fresh_moves_the_old_run_aside_and_keeps_it_whole(tmp_path, tiny_args):
    """An 8-step run (checkpoints every 2, keep 2), then a 4-step --fresh run in its directory:
    the new run's checkpoints and metrics are its own, and the old run is intact aside."""
    every2 = ("training.checkpoint_every=2", "training.log_every=1")
    run(hvdllm("train", TINY, *tiny_args("r", *every2, "training.steps=8")))
    old_losses = train_losses(tmp_path / "r")
    run(hvdllm("train", TINY, *tiny_args("r", *every2, "training.steps=4"), "--fresh"))
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == \
        ["step_00000002", "step_00000004"]
    assert sorted(train_losses(tmp_path / "r")) == [1, 2, 3, 4]
    (aside,) = (tmp_path / "r" / "previous").iterdir()
    assert train_losses(aside) == old_losses
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step_00000006", "step_00000008"]


def test_resume_auto_after_a_crash_before_the_first_checkpoint(tmp_path, tiny_args):
    """A run that died before writing a checkpoint leaves metrics only: auto starts it again."""
    run(hvdllm("train", TINY, *tiny_args("c", "training.steps=3", "training.log_every=1")))
    shutil.rmtree(tmp_path / "c" / "checkpoints")
    run(hvdllm("train", TINY, *tiny_args("c", "training.steps=3", "training.log_every=1"),
               "--resume", "auto"))
    assert [r["step"] for r in read_metrics(tmp_path / "c") if "loss" in r] == [1, 2, 3]


def test_export_replaces_an_earlier_export_only(pipeline_run, tmp_path):
    out = tmp_path / "hf"
    run(hvdllm("export", pipeline_run, out))
    first = json.loads((out / "hvdllm-export.json").read_text())
    assert first["step"] == 4
    run(hvdllm("export", step_dir(pipeline_run, 2), out))  # over an earlier export: allowed
    assert json.loads((out / "hvdllm-export.json").read_text())["step"] == 2
    from transformers import AutoModelForCausalLM
    weights = AutoModelForCausalLM.from_pretrained(out).state_dict()
    saved = torch.load(step_dir(pipeline_run, 2) / "model_stage1.pt", weights_only=True)
    assert torch.equal(weights["transformer.ln_f.weight"], saved["transformer.ln_f.weight"])
