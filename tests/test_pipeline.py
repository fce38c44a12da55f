"""Pipeline and 2-D (stages x replicas) training with real ranks under mpirun.

Layouts are compared on the tiny job with 4 layers: same seed, same global batch, so every
layout must train the same model. Tolerances: fp32 sums in a different order differ in the last
bits, which 20 optimizer steps grow to ~1e-5 relative; we allow 2e-4.
"""

from __future__ import annotations

import signal
import subprocess
import time

import psutil
import pytest
import torch
from conftest import BIN, SCRIPTS, TINY, env, hvdllm, mpirun, read_metrics, run, train_losses

LAYERS = "model.n_layer=4"


def train_layout(tiny_args, name: str, ranks: int, stages: int, *extra: str, check=True):
    args = tiny_args(name, LAYERS, "training.log_every=1", f"parallel.pipeline_stages={stages}",
                     "training.checkpoint_every=10", *extra)
    return mpirun(ranks, hvdllm("train", TINY, *args), timeout=300, check=check)


def assert_same_losses(a: dict, b: dict, rtol: float = 2e-4) -> None:
    assert sorted(a) == sorted(b) and len(a) >= 10
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=rtol), f"step {step}: {a[step]} vs {b[step]}"


# Every family, with its traps: Mistral with a window shorter than the sequence (64), Qwen2 with
# its head tied to the embedding (split over the end stages) and a window too.
FAMILIES = {"gpt2": (), "llama": (),
            "mistral": ("model.sliding_window=16",),
            "qwen2": ("model.tie_embeddings=true", "model.sliding_window=16")}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_parity_across_layouts(family, tiny_args, tmp_path):
    f = (f"model.family={family}", *FAMILIES[family])
    layouts = {"P1R1": (1, 1), "P2R1": (2, 2), "P2R2": (4, 2), "P1R2": (2, 1)}
    for name, (ranks, stages) in layouts.items():
        train_layout(tiny_args, name, ranks, stages, *f)
    ref = train_losses(tmp_path / "P1R1")
    assert ref[20] < ref[1] - 0.3
    for name in layouts:
        assert_same_losses(ref, train_losses(tmp_path / name))
    rows = read_metrics(tmp_path / "P2R2")
    assert rows[0]["bubble_theory"] == pytest.approx(0.5)  # P = 2, m = 8 / (4 x 2) = 1
    assert 0 < rows[-2]["bubble"] < 1
    if family in ("gpt2", "qwen2"):  # the tied weight's two copies are identical after 20 steps
        ckpt = tmp_path / "P2R2" / "checkpoints" / "step_00000020"
        embedding = "transformer.wte.weight" if family == "gpt2" else "model.embed_tokens.weight"
        first = torch.load(ckpt / "model_stage0.pt", weights_only=True)[embedding]
        last = torch.load(ckpt / "model_stage1.pt", weights_only=True)["lm_head.weight"]
        assert torch.equal(first, last)


def test_gradient_parity_per_stage(tiny_args, tmp_path):
    def grads(ranks: int, stages: int) -> dict[str, torch.Tensor]:
        out = tmp_path / f"g{ranks}{stages}"
        mpirun(ranks, [BIN / "python", SCRIPTS / "grads.py", TINY, out,
                       *tiny_args("g", LAYERS, f"parallel.pipeline_stages={stages}")], timeout=180)
        merged: dict[str, torch.Tensor] = {}
        for s in range(stages):
            merged.update(torch.load(f"{out}.stage{s}", weights_only=True))
        return merged

    one, pipe = grads(1, 1), grads(4, 2)
    pipe_names = set(pipe) - {"lm_head.weight"}
    assert pipe_names == set(one)
    for name in one:
        torch.testing.assert_close(pipe[name], one[name], rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(pipe["lm_head.weight"], one["transformer.wte.weight"], rtol=1e-5, atol=1e-7)


def test_gpipe_and_1f1b_agree_and_1f1b_holds_at_most_P(tiny_args, tmp_path):
    m8 = ("parallel.micro_batches=8", "training.micro_batch_size=0")
    train_layout(tiny_args, "gpipe", 2, 2, "parallel.schedule=gpipe", *m8)
    train_layout(tiny_args, "1f1b", 2, 2, "parallel.schedule=1f1b", *m8)
    assert train_losses(tmp_path / "gpipe") == train_losses(tmp_path / "1f1b")  # same arithmetic
    peak = {name: max(r["peak_live_activations"] for r in read_metrics(tmp_path / name) if "loss" in r)
            for name in ("gpipe", "1f1b")}
    assert peak == {"gpipe": 8, "1f1b": 2}


def test_resume_exact_in_2d_and_across_layouts(tiny_args, tmp_path):
    train_layout(tiny_args, "full", 4, 2)
    ck10 = tmp_path / "full" / "checkpoints" / "step_00000010"
    ref = train_losses(tmp_path / "full")
    # Same layout (P = 2 x R = 2): bit-exact.
    mpirun(4, hvdllm("train", TINY, *tiny_args("again", LAYERS, "training.log_every=1",
                                                 "parallel.pipeline_stages=2"), "--resume", ck10),
           timeout=300)
    again = train_losses(tmp_path / "again")
    assert sorted(again) == list(range(11, 21)) and all(again[s] == ref[s] for s in again)
    # The P = 2 checkpoint resumed in one process: same model, same optimizer state.
    run(hvdllm("train", TINY, *tiny_args("single", LAYERS, "training.log_every=1"), "--resume", ck10))
    single = train_losses(tmp_path / "single")
    assert_same_losses({s: ref[s] for s in single}, single)
    # ... and a P = 1 checkpoint resumed as two stages trains on as one process would.
    single20 = tmp_path / "single" / "checkpoints" / "step_00000020"
    on = ("training.log_every=1", "training.steps=30")
    run(hvdllm("train", TINY, *tiny_args("single30", LAYERS, *on), "--resume", single20))
    mpirun(2, hvdllm("train", TINY, *tiny_args("split", LAYERS, *on, "parallel.pipeline_stages=2"),
                     "--resume", single20), timeout=300)
    split = train_losses(tmp_path / "split")
    assert sorted(split) == list(range(21, 31))
    assert_same_losses(train_losses(tmp_path / "single30"), split)
    # A pipeline run exports to one ordinary Hugging Face model with the checkpoint's loss.
    run(hvdllm("export", tmp_path / "full", tmp_path / "hf"))
    from transformers import AutoModelForCausalLM

    from hvdllm.checkpoint import Checkpoint
    from hvdllm.export import load_checkpoint_model
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    merged = load_checkpoint_model(Checkpoint(tmp_path / "full" / "checkpoints" / "step_00000020"))
    x = torch.randint(0, 500, (2, 32))
    with torch.no_grad():  # the exported model computes what the two stages' shards do
        assert torch.equal(hf(input_ids=x).logits, merged(input_ids=x).logits)
    assert hf.config.n_layer == 4


def start_pipeline(tiny_args, run_dir, *extra: str):
    """A long 2-stage run in the background; returns (mpirun process, rank processes) once it
    has logged two steps."""
    args = tiny_args(run_dir.name, LAYERS, "training.log_every=1", "training.steps=100000",
                     "parallel.pipeline_stages=2", *extra)
    proc = subprocess.Popen(["mpirun", "-np", "2", *map(str, hvdllm("train", TINY, *args))],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    ranks = [c for c in psutil.Process(proc.pid).children(recursive=True)
             if "hvdllm" in " ".join(c.cmdline())]
    assert len(ranks) == 2
    return proc, ranks


def test_killed_rank_ends_the_job(tiny_args, tmp_path):
    proc, ranks = start_pipeline(tiny_args, tmp_path / "kill")
    ranks[1].kill()
    killed = time.monotonic()
    proc.communicate(timeout=60)
    assert proc.returncode != 0 and time.monotonic() - killed < 30
    # mpirun SIGKILLs the survivor and exits without waiting for it: on a busy machine the
    # killed rank is still tearing down (state R, ppid 1, empty cmdline) for ~1.5 s after.
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert not [r for r in alive if r.status() != psutil.STATUS_ZOMBIE]


def test_stuck_receive_times_out_with_its_place(tiny_args, tmp_path):
    proc, ranks = start_pipeline(tiny_args, tmp_path / "stuck", "parallel.peer_timeout_s=3")
    stage_of = {r: int(r.environ().get("OMPI_COMM_WORLD_RANK", -1)) for r in ranks}
    frozen = next(r for r, rank in stage_of.items() if rank == 1)
    frozen.send_signal(signal.SIGSTOP)  # stage 1 stops answering; stage 0 must not wait forever
    stopped = time.monotonic()
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if frozen.is_running():
            frozen.send_signal(signal.SIGCONT)
            frozen.kill()
    assert proc.returncode != 0 and time.monotonic() - stopped < 30
    assert "stage 0 of replica 0 (rank 0) waited 3 s for" in err and " in step " in err


def test_activation_checkpointing_keeps_pipeline_losses(tiny_args, tmp_path):
    """2 stages, 2 micro-batches, dropout on: recomputing every block on each micro-batch's
    backward trains the same model (measured bit-identical; the layouts' rtol is asserted)."""
    dropout = "model.dropout=0.1"
    train_layout(tiny_args, "plain", 2, 2, dropout)
    train_layout(tiny_args, "ckpt", 2, 2, dropout, "training.activation_checkpointing=blocks")
    assert 'activation_checkpointing = "blocks"' in (tmp_path / "ckpt" / "job.toml").read_text()
    assert_same_losses(train_losses(tmp_path / "plain"), train_losses(tmp_path / "ckpt"))
