"""`hvdllm memory`'s prediction against real ranks: the peak within 15 % of the measured one (max
over ranks, read from run_info.json) and the exact counts equal, for several layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY, hvdllm, mpirun
from hvdllm.config import load_job
from hvdllm.train.memory import predict

MODEL = ["model.family=llama", "model.n_layer=8", "model.n_embd=512", "model.n_head=8",
         "training.steps=3", "training.log_every=3", "training.eval_every=0"]
LAYOUTS = [(1, 1, "bf16"), (2, 2, "bf16"), (4, 2, "bf16"), (2, 2, "fp32")]
"""(ranks, stages, precision): 1 stage, 2 stages, 2 x 2, and 2 stages in fp32."""


@pytest.mark.parametrize("world,stages,dtype", LAYOUTS)
def test_predicted_peak_within_15_percent(tiny_args, world, stages, dtype):
    sets = MODEL + [f"parallel.pipeline_stages={stages}", f"precision.dtype={dtype}"]
    args = tiny_args("run", *sets)
    mpirun(world, hvdllm("train", TINY, *args), timeout=240)
    run_dir = Path(args[3].split("=", 1)[1])  # tiny_args: data.dir, then run.dir
    info = json.loads((run_dir / "run_info.json").read_text())["memory"]
    job = load_job(TINY, [a for a in args if a != "--set"])
    rows = predict(job, world, "cpu")
    for rank in info["ranks"]:
        row = rows[rank["stage"]]
        assert (rank["parameters"], rank["optimizer"]) == (row.parameters, row.optimizer)
        assert abs(rank["activations_per_micro_batch"] - row.activations_per_micro_batch) <= 16
    predicted = max(r.predicted_peak for r in rows)
    measured = info["measured_peak_max"]
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)
