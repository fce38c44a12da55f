"""Seeing inside a run: profiler traces, Horovod's timeline, the pipeline chart, memory and
communication scalars; real ranks under mpirun, TensorBoard's own reader.

The chart's bubble and the logged bubble come from the same clock reads (the receive spans and
`wait_s`), so they must agree to float rounding (1e-9), not to a timing tolerance.
"""

from __future__ import annotations

import json

import pytest
from conftest import BIN, SCRIPTS, TINY, hvdllm, mpirun, read_metrics

from hvdllm.profile import gantt
from hvdllm.profile.tracing import make_tracer
from hvdllm.train.observe import chart_due


def record(rank: int, stage: int, spans: list[tuple], step_s: float = 1.0) -> dict:
    return {"rank": rank, "stage": stage, "replica": 0, "wall_start": 100.0 + 0.01 * stage,
            "step_s": step_s, "spans": [{"kind": k, "micro": m, "start": a, "end": b}
                                        for k, m, a, b in spans]}


@pytest.mark.unit
def test_chart_is_drawn_and_its_bubble_is_the_receive_share(tmp_path):
    records = [record(0, 0, [("forward", 0, 0.0, 0.2), ("recv", 0, 0.2, 0.6), ("backward", 0, 0.6, 0.9),
                             ("sync", -1, 0.9, 0.95), ("optimizer", -1, 0.95, 1.0)]),
               record(1, 1, [("recv", 0, 0.0, 0.2), ("forward", 0, 0.2, 0.4), ("backward", 0, 0.4, 0.6),
                             ("send", -1, 0.6, 0.7), ("recv", 1, 0.7, 0.8)])]
    image = gantt.draw(records, 7, "test", tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8"
    assert gantt.measured_bubble(records) == pytest.approx((0.4 + 0.3) / 2)


@pytest.mark.unit
def test_large_worlds_draw_replica_zero_only():
    many = [dict(record(r, r % 4, []), replica=r // 4) for r in range(32)]
    assert [r["rank"] for r in gantt.rows_to_draw(many)] == [0, 1, 2, 3]
    assert len(gantt.rows_to_draw(many[:16])) == 16


@pytest.mark.unit
def test_chart_and_trace_schedules(tmp_path):
    assert [d for d in range(1, 11) if chart_due(d, 0, 0, 10)] == [2]
    assert [d for d in range(6, 11) if chart_due(d, 0, 5, 10)] == [7]  # a resumed launch
    assert [d for d in range(1, 11) if chart_due(d, 4, 0, 10)] == [4, 8]
    assert make_tracer(tmp_path, 0, False, False, 3, 2, 0, 10, False) is None  # off: no object
    assert make_tracer(tmp_path, 0, True, False, 3, 2, 8, 10, False) is None  # already trained
    t = make_tracer(tmp_path, 0, True, True, 3, 5, 4, 6, False)
    assert (t.first, t.last) == (5, 6)  # resumed after step 4, the run ends at 6


def test_profiled_pipeline_writes_traces_timeline_and_chart(tiny_args, tmp_path):
    run_dir = tmp_path / "prof"
    sets = ["training.steps=4", "training.log_every=1", "parallel.pipeline_stages=2",
            "training.micro_batch_size=2", "training.profile=true", "parallel.horovod_timeline=true",
            "training.profile_start_step=2", "training.pipeline_chart_every=2"]
    mpirun(2, hvdllm("train", TINY, *tiny_args("prof", *sets)), timeout=300)
    # torch.profiler: one trace per rank; the profiled steps, our spans and the operators in it.
    for rank in (0, 1):
        trace = run_dir / "profile" / f"rank{rank}.steps2-3.pt.trace.json"
        events = json.loads(trace.read_text())["traceEvents"]
        names = {e.get("name", "") for e in events}
        assert {"ProfilerStep#0", "ProfilerStep#1", "hvdllm.forward 0", "hvdllm.backward 3",
                "hvdllm.sync", "hvdllm.optimizer", "aten::addmm"} <= names
        assert any(e.get("name") == "[memory]" for e in events)  # profile_memory
        assert "aten::addmm" in trace.with_name(f"rank{rank}.steps2-3.txt").read_text()
    # Horovod's timeline: valid JSON (closed by stop_timeline) with its own events.
    timeline = json.loads((run_dir / "profile" / "horovod_timeline.steps2-3.json").read_text())
    assert {"NEGOTIATE_ALLREDUCE", "ALLREDUCE"} <= {e.get("name") for e in timeline}
    # The chart of steps 2 and 4: a PNG, its spans, and the bubble the metrics logged.
    bubble = {m["step"]: m["bubble"] for m in read_metrics(run_dir) if "bubble" in m}
    for step in (2, 4):
        png = run_dir / "pipeline" / f"step{step:08d}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
        drawn = json.loads(png.with_suffix(".json").read_text())
        assert sorted(r["stage"] for r in drawn["ranks"]) == [0, 1]
        assert drawn["bubble"] == pytest.approx(gantt.measured_bubble(drawn["ranks"]), abs=1e-12)
        assert drawn["bubble"] == pytest.approx(bubble[step], abs=1e-9)
        for r in drawn["ranks"]:  # 4 micro-batches: a forward and a backward each, in the step
            kinds = [s["kind"] for s in r["spans"]]
            assert kinds.count("forward") == kinds.count("backward") == 4
            starts, ends = [s["start"] for s in r["spans"]], [s["end"] for s in r["spans"]]
            assert 0 <= min(starts) <= max(ends) <= r["step_s"]
    assert_tensorboard(run_dir)


def assert_tensorboard(run_dir) -> None:
    """The chart in TensorBoard's images; memory and communication scalars every logged step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("pipeline/step")] == [2, 4]
    peaks = [e.value for e in acc.Scalars("memory/peak_mb")]
    assert len(peaks) == 4 and peaks == sorted(peaks) and peaks[0] > 100  # a high-water mark
    assert all(e.value > 100 for e in acc.Scalars("memory/mb"))
    assert all(e.value > 0 for e in acc.Scalars("comm/sync_ms"))
    assert len(acc.Scalars("comm/allreduce_bytes")) == 4


def test_data_parallel_logs_collective_bytes_and_nothing_is_profiled_when_off(tiny_args, tmp_path):
    run_dir = tmp_path / "off"
    mpirun(2, [BIN / "python", SCRIPTS / "train_unprofiled.py", TINY,
               *tiny_args("off", "training.steps=4", "training.log_every=2")], timeout=300)
    assert not (run_dir / "profile").exists()
    rows = [m for m in read_metrics(run_dir) if "loss" in m]
    info = json.loads((run_dir / "run_info.json").read_text())
    assert [r["allreduce_bytes"] for r in rows] == [info["allreduce_payload_bytes_rank0"]] * 2
    assert info["allreduce_payload_bytes_rank0"] > 0
    assert (run_dir / "pipeline" / "step00000002.png").is_file()  # the default chart, once
