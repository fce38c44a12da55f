"""`hvdllm slurm` and the sbatch templates: rendering, quoting, validation, and real Slurm runs.

The cluster tests start munged, slurmctld and slurmd on this machine (tests/slurm_cluster.py) and
submit rendered scripts with `sbatch --wait`: every launcher once straight through, once stopped
by a signal and requeued (its losses must equal the straight run's, step by step), and a plain
`scancel` that must not requeue. The jobs run at the same time, so the suite waits for the
slowest one, not for all of them in turn.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import BIN, TINY, hvdllm, run, train_losses
from hvdllm.config import ConfigError, load_job
from hvdllm.launch.checks import launch_problem
from hvdllm.launch.slurm import LAUNCHERS, SlurmOptions, render, time_seconds
from slurm_cluster import CLIENTS, DAEMONS, SlurmCluster, missing_tools

NASTY = ["a b", "q'uote", 'd"q', "$(touch PWNED)", "`touch PWNED`", "; touch PWNED", "x && y #",
         "%j %% 100%", "é ü"]
"""Values that would break or inject into a naively written script."""


needs_shellcheck = pytest.mark.skipif(shutil.which("shellcheck") is None,
                                      reason="shellcheck missing (scripts/setup-slurm.sh installs it)")


def job_with(*sets: str, **flags):
    job = load_job(TINY, list(sets))
    SlurmOptions(**flags).apply(job.slurm)
    return job


def script(tmp_path: Path, *sets: str, **flags) -> str:
    return render(job_with(*sets, **flags), TINY, list(sets), workdir=tmp_path)


def shell_values(text: str, tmp_path: Path) -> dict[str, list[str]]:
    """Run the script's 'What to run' assignments in bash and return the words they hold."""
    block = text.split("# ---- What to run")[1].split("# ---- ")[0]
    block = "\n".join(line for line in block.splitlines()[1:] if not line.startswith("#"))
    show = 'for v in hvdllm job_file run_dir; do printf "%s\\0" "${!v}"; done; printf "\\0";' \
           'printf "%s\\0" "${train[@]}"'
    p = subprocess.run(["bash", "-c", block + "\n" + show], capture_output=True, text=True,
                       cwd=tmp_path, check=True, env={"SLURM_CPUS_PER_TASK": "3"})
    scalars, words = p.stdout.split("\0\0", 1)
    names = ("hvdllm", "job_file", "run_dir")
    return {**dict(zip(names, ([v] for v in scalars.split("\0")))), "train": words.split("\0")[:-1]}


# --------------------------------------------------------------------------------------------
# Rendering: no cluster needed
# --------------------------------------------------------------------------------------------

@needs_shellcheck
@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("gpus", [0, 8])
def test_rendered_scripts_pass_bash_and_shellcheck(tmp_path, launcher, gpus):
    sets = ["slurm.modules=[\"cuda/12.4\", \"nccl\"]", "slurm.env=[\"NCCL_DEBUG=WARN\"]",
            "slurm.sbatch=[\"--mem=0\", \"--exclusive\"]", "slurm.account=proj-1",
            "slurm.cpus_per_task=4", "training.global_batch_size=128"]
    text = script(tmp_path, *sets, nodes=4, tasks_per_node=8, gpus_per_node=gpus,
                  partition="gpu", time="2-00:00:00", launcher=launcher)
    path = tmp_path / "job.sbatch"
    path.write_text(text)
    run(["bash", "-n", path])
    run(["shellcheck", "--shell=bash", path])
    assert "{{" not in text and "#SBATCH --requeue" in text and "--resume auto" in text
    assert ("#SBATCH --gpus-per-node=8" in text) == bool(gpus)
    assert ("OMPI_MCA_mpi_yield_when_idle=1" in text) == (not gpus)  # CPU nodes only
    assert "module load cuda/12.4" in text and "export NCCL_DEBUG=WARN" in text


def test_counts_are_written_once(tmp_path):
    text = script(tmp_path, "training.global_batch_size=572", nodes=13, tasks_per_node=11)
    text = text.replace(str(tmp_path), "TMP").replace(str(TINY), "JOB")  # paths may hold digits
    assert re.findall(r"\b13\b", text) == ["13"] and "#SBATCH --nodes=13\n" in text
    assert re.findall(r"\b11\b", text) == ["11"] and "#SBATCH --ntasks-per-node=11\n" in text
    assert "143" not in text  # the world size is read from SLURM_NTASKS, never written


def test_paths_and_defaults(tmp_path):
    text = script(tmp_path, "run.dir=out/r", "slurm.cpus_per_task=3")
    assert f"#SBATCH --output={tmp_path}/out/r/slurm-%j.out\n" in text
    assert f"#SBATCH --error={tmp_path}/out/r/slurm-%j.err\n" in text
    assert f"#SBATCH --chdir={tmp_path}\n" in text
    assert "#SBATCH --signal=B:USR1@120\n" in text and "#SBATCH --open-mode=append" in text
    values = shell_values(text, tmp_path)
    assert values["hvdllm"] == [str(BIN / "hvdllm")]
    assert values["train"] == [str(BIN / "hvdllm"), "train", str(TINY), "--set", "run.dir=out/r",
                               "--set", "training.threads=3", "--resume", "auto"]  # from Slurm


@needs_shellcheck
@pytest.mark.parametrize("value", NASTY)
def test_values_are_quoted_not_run(tmp_path, value):
    """Every value comes out of bash exactly as it went in, and nothing in it runs."""
    run_dir = f"{tmp_path}/dir {value}"
    sets = [f"run.name={value}", f"run.dir={run_dir}", f"slurm.partition={value}",
            f"slurm.account={value}", f"slurm.hvdllm=/opt/{value}/hvdllm",
            f"slurm.modules={json.dumps([value])}", f"slurm.env={json.dumps(['X=' + value])}",
            f"slurm.sbatch={json.dumps(['--comment=' + value])}"]
    for launcher in LAUNCHERS:
        text = script(tmp_path, *sets, launcher=launcher)
        path = tmp_path / f"{launcher}.sbatch"
        path.write_text(text)
        run(["bash", "-n", path])
        run(["shellcheck", "--shell=bash", path])
        values = shell_values(text, tmp_path)
        assert values["run_dir"] == [run_dir]
        assert values["hvdllm"] == [f"/opt/{value}/hvdllm"]
        assert values["train"][3:] == ["--set", sets[0], "--set", sets[1], "--resume", "auto"]
        directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
        assert len(directives) == 13  # 10 fixed + partition, account, comment: nothing injected
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.parametrize("key", ["run.name", "run.dir", "slurm.partition", "slurm.account",
                                 "slurm.hvdllm", "slurm.time"])
@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "tab\there"])
def test_control_characters_are_refused(tmp_path, key, bad):
    with pytest.raises(ConfigError) as e:
        script(tmp_path, f"{key}={bad}")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("sets, flags, message", [
    ([], {"nodes": 0}, "slurm.nodes must be >= 1"),
    ([], {"tasks_per_node": 0}, "slurm.tasks_per_node must be >= 1"),
    ([], {"gpus_per_node": -1}, "slurm.gpus_per_node must be >= 0"),
    ([], {"tasks_per_node": 4, "gpus_per_node": 8}, "must equal slurm.gpus_per_node (8)"),
    ([], {"time": "1 hour"}, "expected minutes, HH:MM:SS or D-HH:MM:SS"),
    ([], {"time": "0"}, "must be longer than zero"),
    ([], {"time": "2"}, "shorter than the time limit (120 s)"),
    (["slurm.signal_seconds=0"], {}, "slurm.signal_seconds (0) must be > 0"),
    (["slurm.signal_seconds=70000"], {"time": "2-0"}, "at most 65535"),
    ([], {"tasks_per_node": 3}, "3 ranks: training.global_batch_size (8) is not divisible"),
    (["parallel.pipeline_stages=2"], {"tasks_per_node": 3}, "not a multiple of parallel.pipeline_stages"),
    (["parallel.pipeline_stages=2"], {"tasks_per_node": 2, "launcher": "horovodrun"}, "need MPI"),
    (["slurm.sbatch=[\"--nodes=2\"]"], {}, "--nodes is set from slurm.nodes"),
    (["slurm.sbatch=[\"-N 2\"]"], {}, "-N is set from slurm.nodes"),
    (["slurm.sbatch=[\"--output=x\"]"], {}, "--output is set from run.dir"),
    (["slurm.sbatch=[\"mem=0\"]"], {}, "must be an option such as --mem=0"),
    (["slurm.env=[\"1X=a\"]"], {}, "must be NAME=value"),
    (["slurm.env=[\"X\"]"], {}, "must be NAME=value"),
    (["run.dir=a\\\\b"], {}, "cannot contain a backslash"),
])
def test_validation_errors(tmp_path, sets, flags, message):
    with pytest.raises(ConfigError) as e:
        script(tmp_path, *sets, **flags)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text, seconds", [("30", 1800), ("1:30", 90), ("01:00:00", 3600),
                                           ("2-0", 172800), ("1-02:03", 93780),
                                           ("1-02:03:04", 93784)])
def test_time_formats(text, seconds):
    assert time_seconds(text) == seconds


def test_cli_writes_script_and_run_dir(tmp_path):
    out, run_dir = tmp_path / "job.sbatch", tmp_path / "run"
    p = run(hvdllm("slurm", TINY, "--set", f"run.dir={run_dir}", "--nodes", "2", "--tasks-per-node",
                   "1", "--launcher", "mpirun", "--partition", "cpu", "--time", "30", "-o", out))
    text = out.read_text()
    assert p.stdout == "" and "#SBATCH --nodes=2\n" in text and "#SBATCH --partition=cpu" in text
    assert "start_train() { mpirun -np" in text and "#SBATCH --time=30\n" in text
    assert run_dir.is_dir()  # Slurm opens the log files there before the job starts
    assert run(hvdllm("slurm", TINY, "--set", f"run.dir={run_dir}")).stdout.startswith("#!/bin/bash")


@pytest.mark.parametrize("args", [["--nodes", "0"], ["--tasks-per-node", "3"], ["--time", "soon"],
                                  ["--set", "slurm.partition=a\nb"]])
def test_cli_errors_are_one_line_exit_2(tmp_path, args):
    p = run(hvdllm("slurm", TINY, "--set", f"run.dir={tmp_path}", *args), check=False)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("hvdllm slurm: error:")


@pytest.mark.parametrize("env, mpi, gloo, message", [
    ({"OMPI_COMM_WORLD_RANK": "0"}, True, True, ""),
    ({"PMIX_RANK": "1", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2"}, True, True, ""),
    ({"HOROVOD_CONTROLLER": "gloo", "HOROVOD_RANK": "0"}, False, True, ""),
    ({}, True, True, ""),  # one process, no launcher
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3"}, True, True,
     "srun started 4 tasks without an MPI plugin"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, False, True, "Horovod was built without MPI but this run was "
                                                 "launched by MPI"),
    ({}, False, True, "Horovod was built without MPI but training needs it"),
    ({"HOROVOD_CONTROLLER": "gloo"}, True, False, "Horovod was built without Gloo"),
])
def test_launch_problems(env, mpi, gloo, message):
    problem = launch_problem(env, mpi_built=mpi, gloo_built=gloo)
    assert (message in problem) if message else problem == ""
    assert "\n" not in problem


# --------------------------------------------------------------------------------------------
# A real Slurm
# --------------------------------------------------------------------------------------------

needs_slurm = pytest.mark.skipif(
    bool(missing_tools()) or os.geteuid() != 0,
    reason=f"the one-machine Slurm needs root and {', '.join(DAEMONS + CLIENTS)} (scripts/setup-slurm.sh "
           f"installs them); missing: {missing_tools()}")
STEPS = 200


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def job_env(cluster: SlurmCluster) -> dict[str, str]:
    """What a user's shell would pass to sbatch: no MPI tuning from the tests, only root's permit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMPI_MCA_")}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return cluster.env(env)


class Job:
    """One rendered script submitted with `sbatch --wait`, optionally signalled while it runs.

    when: "" (never), "early" (as soon as the batch shell runs) or "mid" (after 10 logged steps);
    then `scancel *how JOBID`. `sets`: more overrides; `layout`: `hvdllm slurm`'s flags (nodes,
    tasks_per_node); `env`: sbatch's environment (default job_env).
    """

    def __init__(self, cluster: SlurmCluster, base: Path, name: str, launcher: str, data: Path,
                 when: str = "", how: tuple[str, ...] = (), *, steps: int = STEPS,
                 sets: tuple[str, ...] = (), layout: dict | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.cluster, self.launcher, self.when, self.how = cluster, launcher, when, how
        self.env = env or job_env(cluster)
        self.name = f"{name} $(touch PWNED); '%j'"  # quoting is exercised by every real job
        self.run_dir = base / f"{name} \"$(touch PWNED)\" 100%j"
        self.sets = [f"data.dir={data}", f"run.dir={self.run_dir}", f"run.name={self.name}",
                     f"training.steps={steps}", "training.log_every=1", *sets]
        self.run_dir.mkdir(parents=True)  # as `hvdllm slurm` does: Slurm writes its logs there
        self.script = base / f"{name}.sbatch"
        flags = {"tasks_per_node": 2, **(layout or {}), "launcher": launcher}
        self.script.write_text(render(job_with(*self.sets, **flags), TINY, self.sets,
                                      workdir=base))
        self.returncode, self.output, self.job_id, self.error = None, "", "", ""

    def run(self, timeout: float = 420) -> None:
        try:
            p = subprocess.Popen(["sbatch", "--wait", str(self.script)], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env=self.env)
            if self.when:
                self._signal(p, time.monotonic() + timeout)
            self.output = p.communicate(timeout=timeout)[0]
            self.returncode = p.returncode
            self.job_id = re.search(r"Submitted batch job (\d+)", self.output)[1]
        except Exception as e:  # reported by the test that looks at this job
            self.error = repr(e)
            p.kill()

    def _signal(self, sbatch: subprocess.Popen, deadline: float) -> None:
        """Wait for the moment (see the class), then scancel."""
        while time.monotonic() < deadline and sbatch.poll() is None:
            outs = list(self.run_dir.glob("slurm-*.out"))
            metrics = self.run_dir / "metrics.jsonl"
            ready = (outs and outs[0].stat().st_size > 0) if self.when == "early" else \
                metrics.exists() and len(metrics.read_text().splitlines()) >= 10
            if ready:
                job_id = outs[0].name.split("-")[1].split(".")[0]
                subprocess.run(["scancel", *self.how, job_id], env=self.env, check=True)
                return
            time.sleep(0.1)

    def log(self, kind: str) -> str:
        return (self.run_dir / f"slurm-{self.job_id}.{kind}").read_text()

    def describe(self) -> str:
        tail = {k: self.log(k)[-3000:] for k in ("out", "err") if self.job_id
                and (self.run_dir / f"slurm-{self.job_id}.{k}").exists()}
        return f"{self.name}: {self.error} sbatch: {self.output}\n{tail}"


@pytest.fixture(scope="module")
def jobs(cluster, tiny_data, tmp_path_factory) -> dict[str, Job]:
    """All the cluster jobs, submitted together and waited for."""
    base = tmp_path_factory.mktemp("slurm-jobs")
    warn = ("--batch", "--signal=USR1")  # what --signal=B:USR1@N does before the time limit
    specs = {f"plain-{launcher}": (launcher, "", ()) for launcher in LAUNCHERS}
    specs.update({"preempt-srun": ("srun", "early", warn), "preempt-mpirun": ("mpirun", "mid", warn),
                  "preempt-horovodrun": ("horovodrun", "mid", warn),
                  "steps-term-srun": ("srun", "mid", ("--signal=TERM",)),  # the tasks, not the shell
                  "cancel-srun": ("srun", "mid", ())})
    return run_all(base, {name: Job(cluster, base, name, launcher, tiny_data, when, how)
                          for name, (launcher, when, how) in specs.items()})


def run_all(base: Path, jobs: dict[str, Job]) -> dict[str, Job]:
    """Submit the jobs (made in `base`) at once and wait for all of them."""
    threads = [threading.Thread(target=job.run) for job in jobs.values()]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"slurm jobs: {time.monotonic() - start:.0f} s for {len(jobs)} concurrent jobs")
    assert not list(base.rglob("PWNED")), "a rendered value was executed"
    return jobs


def world_sizes(err: str) -> list[int]:
    """The world size rank 0 logged at each start; a rank that trained alone would log 1."""
    return [int(n) for n in re.findall(r"\] (\d+) rank\(s\) = ", err)]


@needs_slurm
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_job_runs_to_completion(cluster, jobs, launcher):
    job = jobs[f"plain-{launcher}"]
    assert job.returncode == 0, job.describe()
    info = cluster.show_job(job.job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", info
    assert re.search(r"JobName=(.*) UserId=", subprocess.run(
        ["scontrol", "show", "job", "--oneliner", job.job_id], capture_output=True, text=True,
        env=cluster.env()).stdout)[1] == job.name
    assert world_sizes(job.log("err")) == [2], job.describe()
    assert sorted(train_losses(job.run_dir)) == list(range(1, STEPS + 1))
    assert (job.run_dir / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").is_file()
    assert f"{launcher} exited with status 0" in job.log("out")


@needs_slurm
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_signal_checkpoints_requeues_and_resumes_exactly(cluster, jobs, launcher):
    job, plain = jobs[f"preempt-{launcher}"], jobs[f"plain-{launcher}"]
    assert job.returncode == 0, job.describe()
    info = cluster.show_job(job.job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    out, err = job.log("out"), job.log("err")
    assert "restart 0:" in out and "requeueing job" in out and "restart 1:" in out, job.describe()
    stopped = re.search(r"stopped by SIGUSR1 after step (\d+)", err)
    if stopped:  # the ranks finished a step, wrote a checkpoint and the requeued run resumed there
        step = int(stopped[1])
        assert 0 < step < STEPS and f"resumed from {job.run_dir}/checkpoints/step_{step:08d}" in err
        assert world_sizes(err) == [2, 2]
    else:  # signalled at once (srun): a rank still importing may die of it; requeued all the same
        assert job.when == "early" and "resumed from" not in err, job.describe()
    assert train_losses(job.run_dir) == train_losses(plain.run_dir)  # every step, exactly


@needs_slurm
def test_term_to_the_job_steps_also_checkpoints_and_requeues(cluster, jobs):
    """`scancel --signal=TERM` without --batch reaches srun's tasks only; they exit 75 all the same."""
    job = jobs["steps-term-srun"]
    assert job.returncode == 0, job.describe()
    info = cluster.show_job(job.job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    step = int(re.search(r"stopped by SIGTERM after step (\d+)", job.log("err"))[1])
    assert f"checkpoints/step_{step:08d} (step {step}" in job.log("err")
    assert "stopped early (status 75); requeueing" in job.log("out")
    assert train_losses(job.run_dir) == train_losses(jobs["plain-srun"].run_dir)


@needs_slurm
def test_plain_scancel_is_not_requeued(cluster, jobs):
    job = jobs["cancel-srun"]
    # (sbatch --wait's own status for a cancelled job depends on when the cancel lands: 0 or not)
    assert job.returncode is not None and not job.error, job.describe()
    info = cluster.show_job(job.job_id)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    assert "requeueing" not in job.log("out")


@needs_slurm
def test_srun_without_mpi_plugin_is_one_clear_line(cluster, tiny_data, tmp_path):
    # Each task's stderr goes to its own file (%t = task id): never parse merged output.
    cmd = ["srun", "--ntasks=2", "--mpi=none", f"--error={tmp_path}/task%t.err",
           BIN / "hvdllm", "train", TINY,
           "--set", f"data.dir={tiny_data}", "--set", f"run.dir={tmp_path / 'run'}"]
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120,
                       env=job_env(cluster))
    assert p.returncode == 2, p.stderr
    for task in (0, 1):  # one line from each task
        err = (tmp_path / f"task{task}.err").read_text()
        lines = [line for line in err.splitlines() if "hvdllm train: error:" in line]
        assert len(lines) == 1, err
        assert "srun started 2 tasks without an MPI plugin" in lines[0] and "--mpi=pmix" in lines[0]
        assert "Traceback" not in err and "MPI_Init" not in err
