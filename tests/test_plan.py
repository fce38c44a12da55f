"""`hvdllm plan`: the layouts it enumerates run, its cost terms follow their formulas, and its
predictions are checked against a table of runs measured here (tests/data/plan-validation.json,
written by `hvdllm bench --plan`; no timing in this test).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import ROOT, TINY, hvdllm, run

from hvdllm.bench.plan_rows import HOST_LINKS, THIS_NODE, place_model
from hvdllm.config import load_job
from hvdllm.layout import job_layout
from hvdllm.plan import PRESETS, CostModel, candidates, load_cluster
from hvdllm.plan.calibrate import loop_fit
from hvdllm.plan.cluster import Link, Rates, cluster_from_json
from hvdllm.plan.space import Candidate

VALIDATION = Path(__file__).parent / "data" / "plan-validation.json"


def quiet_cluster(**rates) -> object:
    """A GPU preset with free links and only the named rates (others 0), for exact formulas."""
    c = PRESETS["h100-80g-8x-ib400"]()
    free = Link(0.0, 1e30)
    c.rates = {0: Rates(**{"flop_s": 0.0, "layer_s": 0.0, "param_s": 0.0, **rates})}
    c.allreduce_intra = c.allreduce_inter = c.p2p_intra = c.p2p_inter = free
    c.overlap = 0.0
    return c


def test_every_candidate_is_a_valid_job_on_its_world():
    job = load_job(TINY, ["parallel.pipeline_stages=2", "parallel.stage_layers=[1,1]"])
    found = list(candidates(job, 4))
    assert {c.stages for c in found} == {1, 2} and {c.replicas for c in found} == {2, 4}
    assert len(found) == len(set(found))
    for c in found:
        assert c.world == 4
        again = load_job(TINY, c.sets())  # the job's own validation (stages cut balanced)
        lay = job_layout(again, 4)
        assert (lay.stages, lay.replicas, lay.micro_batches, lay.micro_batch_size) == \
            (c.stages, c.replicas, c.micro_batches, c.micro_batch_size)
        assert c.apply(job) == again


def test_one_stage_step_is_micro_batches_times_flops_plus_optimizer():
    job = load_job(TINY, ["precision.dtype=bf16"])  # presets run fp32 at the FP32 peak
    model = CostModel(job, quiet_cluster(flop_s=1e-12, param_s=1e-9), ranks_per_node=1)
    c = Candidate(1, 1, 2, 4)
    e = model.estimate(c)
    sizes = model._stages(1)[1][0]
    assert e.compute_s == pytest.approx(2 * 4 * job.data.seq_len * sizes.flops_per_token * 1e-12)
    assert e.optimizer_s == pytest.approx(sizes.params * 1e-9)
    assert e.bubble_s == e.messages_s == e.exchange_s == e.shared_s == 0
    ckpt = model.estimate(replace(c, checkpointing="blocks"))
    assert ckpt.compute_s / e.compute_s == pytest.approx(
        1 + sizes.checkpoint_flops_per_token / sizes.flops_per_token)


def test_pipeline_bubble_follows_m_plus_p_minus_1():
    """Equal stages (blocks only, no FLOPs): the step is (m + P - 1) stage times."""
    job = load_job(TINY)
    model = CostModel(job, quiet_cluster(layer_s=1e-3), ranks_per_node=2)
    for m in (1, 4):
        e = model.estimate(Candidate(2, 1, m, 8 // m))
        assert e.compute_s == pytest.approx(m * 1e-3)
        assert e.compute_s + e.bubble_s == pytest.approx((m + 2 - 1) * 1e-3)


def test_ring_exchange_is_2_r_minus_1_hops_of_a_share():
    job = load_job(TINY)
    cluster = quiet_cluster()
    cluster.allreduce_intra = Link(1e-5, 1e9)
    model = CostModel(job, cluster, ranks_per_node=4)
    params = model._stages(1)[1][0].params
    for r, compression, wire in ((2, "none", 4), (4, "none", 4), (4, "fp16", 2)):
        e = model.estimate(Candidate(1, r, 1, 8 // r, compression=compression))
        assert e.exchange_s == pytest.approx(2 * (r - 1) * (1e-5 + wire * params / r / 1e9))
    zero = model.estimate(Candidate(1, 2, 1, 4, zero=1))
    assert zero.exchange_s == pytest.approx(2 * (1e-5 + 4 * params / 2 / 1e9))


def test_calibration_fit_and_interpolation():
    assert loop_fit(t1=1.1, t2=2.1, pieces_s=0.5) == pytest.approx((2.0, 0.1))
    assert loop_fit(t1=1.0, t2=2.3, pieces_s=1.0) == (1.0, 0.0)  # t2 > 2 t1: no fixed part
    rates = Rates(pieces={"block": [[100, 1.0], [200, 3.0]]})
    assert [rates.piece_s("block", t) for t in (50, 100, 150, 200, 400)] == \
        pytest.approx([0.5, 1.0, 2.0, 3.0, 6.0])


def test_cluster_file_round_trips():
    c = PRESETS["a100-80g-8x-ib200"]()
    assert cluster_from_json(c.to_json(), "x") == c


def validation() -> dict:
    return json.loads(VALIDATION.read_text())


def validation_model(v: dict, cand: Candidate, place: str) -> CostModel:
    job = load_job(ROOT / v["job_file"], v["job_sets"])
    return place_model(job, cluster_from_json(json.dumps(v["cluster_file"]), "recorded"), cand, place)


def test_cost_model_against_the_recorded_runs():
    """Predictions from the recorded calibration against the recorded measurements: the
    errors stated in docs/planning.md (step time within 15 % median, the first choice within
    10 % of the fastest; memory: see the docs), and the same predictions the bench made."""
    v = validation()
    errors, mem_errors, predicted = [], [], {}
    for row in v["rows"]:
        cand = Candidate(**row["candidate"])
        e = validation_model(v, cand, row["place"]).estimate(cand)
        assert e.step_s == pytest.approx(row["predicted_step_s"], rel=1e-6)
        errors.append(abs(e.step_s / row["measured_step_s"] - 1))
        mem_errors.append(abs(e.peak_bytes / row["measured_peak_bytes"] - 1))
        if row["place"] == THIS_NODE:  # the planner's choice is among layouts on one node
            predicted[row["layout"]] = e.step_s
    measured = {r["layout"]: r["measured_step_s"] for r in v["rows"] if r["place"] == THIS_NODE}
    assert len(v["rows"]) >= 8 and {r["place"] for r in v["rows"]} >= {THIS_NODE, *HOST_LINKS}
    assert statistics.median(errors) <= 0.15, errors
    assert statistics.median(mem_errors) <= MEMORY_ERROR_MEDIAN, mem_errors
    first = min(predicted, key=predicted.get)
    assert measured[first] <= 1.10 * min(measured.values())


MEMORY_ERROR_MEDIAN = 0.10
"""The target of the issue that asked for the planner (met here: docs/planning.md)."""


def test_plan_cli_writes_a_job_and_an_sbatch_script_for_the_best(tmp_path):
    job_out, script = tmp_path / "best.toml", tmp_path / "best.sbatch"
    p = run(hvdllm("plan", TINY, "--nodes", "2", "--gpus-per-node", "2", "--cluster",
                   "a100-80g-8x-ib200", "--top", "3", "--write-job", job_out, "--slurm", script,
                   "--set", f"run.dir={tmp_path / 'run'}"), timeout=120)
    assert "#1 over #2:" in p.stdout and "run the best:" in p.stdout
    best = load_job(job_out)
    sets = p.stdout.split("run the best:\n")[1].split()
    assert all(f"{k}={v}" in sets for k, v in [
        ("parallel.pipeline_stages", best.parallel.pipeline_stages),
        ("training.micro_batch_size", best.training.micro_batch_size)])
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "parallel.pipeline_stages=" in text
    assert load_cluster("h200-141g-8x-ib400").devices_per_node == 8
