"""`hvdllm bench --quick` as a smoke test: every row measured, reports written (no speed asserts);
and the bench package's modules import each other without a cycle."""

from __future__ import annotations

import ast
import json
import os

import pytest
from conftest import ROOT, TINY, hvdllm, run

BENCH = ROOT / "hvdllm" / "bench"


def bench_imports(path) -> set[str]:
    """The hvdllm.bench modules a module imports (at its top or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hvdllm.bench."):
            found.add(node.module.removeprefix("hvdllm.bench."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("hvdllm.bench.") for a in node.names
                      if a.name.startswith("hvdllm.bench.")}
    return found


@pytest.mark.unit
def test_bench_modules_import_without_a_cycle():
    graph = {p.stem: bench_imports(p) for p in BENCH.glob("*.py") if p.stem != "__init__"}
    assert {"runner", "ddp_peer", "report", "cases"} <= graph.keys()
    assert all(deps <= graph.keys() for deps in graph.values()), graph
    done: list[str] = []
    while len(done) < len(graph):  # take a module whose imports are all taken: a cycle stops it
        ready = sorted(m for m, deps in graph.items() if m not in done and deps <= set(done))
        assert ready, f"import cycle among {sorted(set(graph) - set(done))}: {graph}"
        done += ready
    assert not list(ROOT.glob("hvdllm/bench*.py"))  # the old flat modules are gone


def test_bench_quick_writes_all_reports(tmp_path):
    out = tmp_path / "bench"
    # No data.dir: the bench prepares <run.dir>/data once and points every launch at it.
    # One launch per row (--repeats 1): the reports are what is tested here, not the spread.
    p = run(hvdllm("bench", TINY, "--quick", "--steps", "3", "--repeats", "1", "--out", out,
                   "--set", f"run.dir={tmp_path / 'run'}"), timeout=600)
    summary = json.loads((out / "bench.json").read_text())
    names = [r["name"] for r in summary["rows"]]
    assert names[:6] == ["1 rank fp32", "1 rank bf16", "2 ranks torch DDP fp32",
                         "2 ranks Horovod fp32", "2 ranks Horovod fp32 fp16 compression",
                         "2 ranks Horovod fp32 bf16 compression"]
    assert {"pipeline P=2 gpipe m=4 fp32", "pipeline P=2 1f1b m=4 fp32", "1 rank fp32 profiled"
            } <= set(names)
    for row in summary["rows"]:
        assert row["tokens_per_s"] > 0 and len(row["step_ms_repeats"]) == 1
        assert row["peak_memory_mib"] > 100  # measured by every launch, the DDP peer's too
    # GPipe and 1F1B drawn side by side; the profiled row traced its steps.
    charts = summary["pipeline_charts"]
    assert sorted(charts) == ["pipeline P=2 1f1b m=4 fp32", "pipeline P=2 gpipe m=4 fp32"]
    assert all((out / f).read_bytes()[:4] == b"\x89PNG" and f in (out / "bench.md").read_text()
               for f in charts.values())
    assert list((out / "runs" / "1_rank_fp32_profiled-0" / "profile").glob("rank0.steps3-5.*"))
    hvd, fp16, bf16 = summary["rows"][3], summary["rows"][4], summary["rows"][5]
    assert fp16["allreduce_payload_bytes"] * 2 == hvd["allreduce_payload_bytes"] > 0  # counted
    assert bf16["allreduce_payload_bytes"] == fp16["allreduce_payload_bytes"]
    assert all(0 <= r["bubble"] < 1 for r in summary["rows"] if "bubble" in r)
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 2 ranks Horovod fp32 |" in (out / "bench.md").read_text()
    assert "| 2 ranks Horovod fp32 |" in p.stdout


def test_bench_memory_rows_count_what_each_layout_saves(tmp_path):
    out = tmp_path / "bench"
    p = run(hvdllm("bench", TINY, "--memory", "--quick", "--repeats", "1", "--steps", "2",
                   "--out", out, "--set", f"run.dir={tmp_path / 'run'}", "--set", "model.n_layer=4"),
            timeout=600)
    s = json.loads((out / "bench-memory.json").read_text())
    rows = {r["name"]: r for r in s["rows"]}
    assert list(rows) == ["1 stage, 1 rank", "2 stages", "4 stages", "data parallel R=2",
                          "ZeRO-1 R=2", "1 rank, activation checkpointing"]
    for r in rows.values():
        assert r["step_ms"] > 0 and r["measured_peak"] > 0 and r["predicted_peak"] > 0
    # Counted, not timed: ZeRO-1 holds half the optimizer state of plain data parallelism (each
    # replica also keeps a 4-byte step per parameter part, and the larger part of an odd size),
    # a stage of four a quarter of the model's, checkpointing fewer activations.
    dp, zero = rows["data parallel R=2"], rows["ZeRO-1 R=2"]
    assert 0 <= 2 * zero["optimizer_per_rank"] - dp["optimizer_per_rank"] <= 12 * 100  # < 100 tensors
    assert rows["4 stages"]["optimizer_per_rank"] < rows["1 stage, 1 rank"]["optimizer_per_rank"] / 2
    assert rows["1 rank, activation checkpointing"]["activations"] < rows["1 stage, 1 rank"]["activations"]
    assert "| ZeRO-1 R=2 | 2 |" in p.stdout and (out / "bench-memory.md").read_text() == p.stdout


def test_bench_plan_calibrates_predicts_and_measures(tmp_path):
    """The planner's small validation case: calibration, three layouts predicted and run, the
    errors reported (not asserted: times here are noisy); then a plan from that calibration."""
    out = tmp_path / "bench"
    run(hvdllm("bench", TINY, "--plan", "--quick", "--steps", "2", "--out", out,
               "--set", f"run.dir={tmp_path / 'run'}"), timeout=600)
    summary = json.loads((out / "bench-plan.json").read_text())
    assert [r["ranks"] for r in summary["rows"]] == [1, 2, 2]
    for row in summary["rows"]:
        assert row["predicted_step_s"] > 0 and row["measured_step_s"] > 0
        assert row["predicted_peak_bytes"] > 100 * 2**20 < row["measured_peak_bytes"]
    assert "Median step-time error" in (out / "bench-plan.md").read_text()
    cluster = json.loads((out / "cluster.json").read_text())
    from hvdllm.plan.calibrate import thread_counts

    assert [int(t) for t in cluster["rates"]] == thread_counts(os.cpu_count() or 1)
    assert cluster["device"] == "cpu"
    p = run(hvdllm("plan", TINY, "--gpus-per-node", "2", "--cluster", out / "cluster.json"))
    assert "calibrated on the model" in p.stdout and "#1 over #2" in p.stdout
    refused = run(hvdllm("plan", TINY, "--gpus-per-node", "2", "--cluster", out / "cluster.json",
                         "--set", "data.seq_len=32"), check=False)
    assert refused.returncode == 2 and "run hvdllm calibrate on this job" in refused.stderr
