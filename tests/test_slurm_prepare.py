"""The rendered sbatch scripts prepare the data across the job's tasks before they train.

On the one-machine Slurm of tests/test_slurm.py (its `cluster` fixture): a job on a fresh data
directory prepares it with its 2 tasks (srun, mpirun) or one process (horovodrun) and trains; a
second job on the same directory finds it up to date; a stop request during the prepare requeues
the job, which prepares what is left and trains. Which rank tokenized what is read from each
rank's own log file (hvdllm is wrapped by a script that sends each prepare's stderr to a file
named by its rank), never from the merged job log.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import BIN, TINY, train_losses
from hvdllm.launch.slurm import render
from test_slurm import cluster, job_env, job_with, needs_slurm, world_sizes  # noqa: F401 (fixture)

STEPS = 10
UNITS_SETS = ["data.shard_bytes=65536", "data.workers=1"]
"""Several work units (the tiny corpus is about 0.4 MB), so that two ranks share them."""

WRAPPER = """#!/bin/bash
# hvdllm, with each prepare's stderr in its own file: LOGS/prepare.JOB.RESTART.RANK.PID.err
if [ "$1" = prepare ]; then
    rank=${{PMIX_RANK:-${{OMPI_COMM_WORLD_RANK:-solo}}}}
    exec {real} "$@" 2>{logs}/"prepare.$SLURM_JOB_ID.${{SLURM_RESTART_COUNT:-0}}.$rank.$$.err"
fi
exec {real} "$@"
"""


class PrepJob:
    """One rendered script, submitted with `sbatch --wait` (optionally stopped once it starts)."""

    def __init__(self, cluster, base: Path, name: str, launcher: str, data: Path,
                 stop: bool = False) -> None:
        self.cluster, self.launcher, self.data, self.stop = cluster, launcher, data, stop
        self.base = base / name
        self.logs, self.run_dir = self.base / "rank logs", self.base / "run dir"
        self.logs.mkdir(parents=True)
        self.run_dir.mkdir()
        bindir = self.base / "bin"
        bindir.mkdir()
        wrapper = bindir / "hvdllm"
        wrapper.write_text(WRAPPER.format(real=BIN / "hvdllm", logs=f"'{self.logs}'"))
        wrapper.chmod(0o755)
        (bindir / "horovodrun").symlink_to(BIN / "horovodrun")  # next to "hvdllm", as installed
        sets = [f"data.dir={data}", f"run.dir={self.run_dir}", f"run.name={name}",
                f"training.steps={STEPS}", "training.log_every=1", f"slurm.hvdllm={wrapper}",
                *UNITS_SETS]
        self.script = self.base / "job.sbatch"
        self.script.write_text(render(job_with(*sets, tasks_per_node=2, launcher=launcher), TINY,
                                      sets, workdir=self.base))
        self.returncode, self.output, self.job_id, self.error = None, "", "", ""

    def run(self, timeout: float = 240) -> None:
        try:
            p = subprocess.Popen(["sbatch", "--wait", str(self.script)], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env=job_env(self.cluster))
            if self.stop:
                self._stop_during_prepare(p, time.monotonic() + timeout)
            self.output = p.communicate(timeout=timeout)[0]
            self.returncode = p.returncode
            self.job_id = re.search(r"Submitted batch job (\d+)", self.output)[1]
        except Exception as e:  # reported by the test that looks at this job
            self.error = repr(e)
            p.kill()

    def _stop_during_prepare(self, sbatch: subprocess.Popen, deadline: float) -> None:
        """As soon as a prepare rank has its log file: what --signal=B:USR1@N does."""
        while time.monotonic() < deadline and sbatch.poll() is None:
            started = list(self.logs.glob("prepare.*.0.*.err"))
            if started:
                job_id = started[0].name.split(".")[1]
                subprocess.run(["scancel", "--batch", "--signal=USR1", job_id],
                               env=job_env(self.cluster), check=True)
                return
            time.sleep(0.05)

    def log(self, kind: str) -> str:
        return (self.run_dir / f"slurm-{self.job_id}.{kind}").read_text()

    def rank_logs(self, restart: int = 0) -> dict[str, str]:
        """RANK -> that prepare's stderr, for this job's start number `restart`."""
        return {p.name.split(".")[3]: p.read_text()
                for p in self.logs.glob(f"prepare.{self.job_id}.{restart}.*.err")}

    def losses(self) -> dict[int, float]:
        """Step -> training loss of this job's run (its metrics file must exist)."""
        assert (self.run_dir / "metrics.jsonl").exists(), f"no metrics: {self.describe()}"
        return train_losses(self.run_dir)

    def describe(self) -> str:
        tail = {k: self.log(k)[-3000:] for k in ("out", "err") if self.job_id
                and (self.run_dir / f"slurm-{self.job_id}.{k}").exists()}
        ranks = {p.name: p.read_text()[-1500:] for p in self.logs.glob("*.err")}
        return f"{self.error} sbatch: {self.output}\n{tail}\nrank logs: {ranks}"


def units_tokenized(err: str) -> int:
    m = re.search(r"tokenizing (\d+) units", err)
    return int(m[1]) if m else -1


def run_together(jobs: list[PrepJob]) -> None:
    threads = [threading.Thread(target=job.run) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.fixture(scope="module")
def prep_jobs(cluster, tmp_path_factory) -> dict[str, PrepJob]:  # noqa: F811
    """Fresh-data jobs for each launcher and a stopped one, together; then a second job on the
    srun job's data (which must find it up to date)."""
    base = tmp_path_factory.mktemp("slurm-prepare")
    data = {name: base / f"data {name}" for name in ("srun", "mpirun", "horovodrun", "stop")}
    first = {f"fresh-{launcher}": PrepJob(cluster, base, f"fresh-{launcher}", launcher,
                                          data[launcher]) for launcher in ("srun", "mpirun", "horovodrun")}
    first["stop-srun"] = PrepJob(cluster, base, "stop-srun", "srun", data["stop"], stop=True)
    start = time.monotonic()
    run_together(list(first.values()))
    again = PrepJob(cluster, base, "again-srun", "srun", data["srun"])
    again.meta_before = (data["srun"] / "meta.json").read_bytes() \
        if (data["srun"] / "meta.json").exists() else b""
    again.run()
    print(f"slurm prepare jobs: {time.monotonic() - start:.0f} s")
    return {**first, "again-srun": again}


@needs_slurm
@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_fresh_data_is_prepared_by_every_task_then_trained(cluster, prep_jobs, launcher):  # noqa: F811
    job = prep_jobs[f"fresh-{launcher}"]
    assert job.returncode == 0, job.describe()
    info = cluster.show_job(job.job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", info
    meta = json.loads((job.data / "meta.json").read_text())
    ranks = job.rank_logs()
    assert sorted(ranks) == ["0", "1"], job.describe()  # two prepare processes, ranks 0 and 1
    # Only rank 0 logs: it tokenized its round-robin share (units 0, 2, ...), rank 1 the rest, and
    # rank 0 wrote the index; rank 1's own stderr holds no error.
    assert meta["units"] >= 2, meta
    assert units_tokenized(ranks["0"]) == (meta["units"] + 1) // 2, job.describe()
    assert "prepared " in ranks["0"] and ranks["1"].strip() == "", job.describe()
    assert world_sizes(job.log("err")) == [2], job.describe()
    assert sorted(job.losses()) == list(range(1, STEPS + 1))
    out = job.log("out")
    assert "prepare exited with status 0" in out and f"train: {launcher} exited with status 0" in out


@needs_slurm
def test_horovodrun_prepares_in_one_process_then_trains(cluster, prep_jobs):  # noqa: F811
    job = prep_jobs["fresh-horovodrun"]
    assert job.returncode == 0, job.describe()
    meta = json.loads((job.data / "meta.json").read_text())
    ranks = job.rank_logs()
    assert list(ranks) == ["solo"] and units_tokenized(ranks["solo"]) == meta["units"], job.describe()
    assert world_sizes(job.log("err")) == [2], job.describe()
    assert sorted(job.losses()) == list(range(1, STEPS + 1))


@needs_slurm
def test_second_job_finds_the_data_up_to_date(cluster, prep_jobs):  # noqa: F811
    job = prep_jobs["again-srun"]
    assert job.returncode == 0, job.describe()
    ranks = job.rank_logs()
    assert sorted(ranks) == ["0", "1"], job.describe()
    assert "is up to date" in ranks["0"] and "tokenizing" not in ranks["0"], job.describe()
    assert ranks["1"].strip() == "", job.describe()  # (only rank 0 logs; no error on rank 1)
    assert (job.data / "meta.json").read_bytes() == job.meta_before  # not rewritten
    assert sorted(job.losses()) == list(range(1, STEPS + 1))
    # the same data as the first job's: the same losses
    assert job.losses() == prep_jobs["fresh-srun"].losses()


@needs_slurm
def test_stop_during_prepare_requeues_and_the_requeued_job_trains(cluster, prep_jobs):  # noqa: F811
    job = prep_jobs["stop-srun"]
    assert job.returncode == 0, job.describe()
    info = cluster.show_job(job.job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    out = job.log("out")
    first, second = out.split("restart 1:")
    assert "requeueing job" in first and "train:" not in first, job.describe()  # no training
    assert world_sizes(job.log("err")) == [2], job.describe()  # trained once, after the requeue
    assert sorted(job.losses()) == list(range(1, STEPS + 1))
    assert sorted(job.rank_logs(1)) == ["0", "1"], job.describe()  # prepared (or found) again
    assert "prepare exited with status 0" in second
    # same data as an unstopped prepare of the same job: the same shards, the same index
    fresh = json.loads((prep_jobs["fresh-srun"].data / "meta.json").read_text())
    assert json.loads((job.data / "meta.json").read_text())["train"] == fresh["train"]
