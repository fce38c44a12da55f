"""Job files: parsing, every validation error, typed overrides, and the CLI's one-line errors."""

from __future__ import annotations

import pytest
from conftest import ROOT, TINY, hvdllm, run

from hvdllm.config import (
    ConfigError,
    JobConfig,
    dump_toml,
    job_from_toml,
    load_job,
    parse_override,
)


def write(tmp_path, text: str):
    p = tmp_path / "job.toml"
    p.write_text(text)
    return p


def test_shipped_jobs_are_valid():
    for path in sorted((ROOT / "jobs").glob("*.toml")):
        load_job(path)


def test_defaults_and_values(tmp_path):
    job = load_job(write(tmp_path, '[run]\nname = "x"\n[training]\nsteps = 7\n[optim]\nlr = 1\n'))
    assert job.run.name == "x" and job.training.steps == 7
    assert job.optim.lr == 1.0 and isinstance(job.optim.lr, float)  # ints widen to floats
    assert job.model.family == "gpt2"
    assert str(job.run_dir) == "runs/x" and str(job.data_dir) == "runs/x/data"


@pytest.mark.parametrize("text, message", [
    ("[trainig]\nsteps = 1\n", "unknown section 'trainig'; did you mean 'training'?"),
    ("[training]\nstesp = 1\n", "unknown key in [training] 'stesp'; did you mean 'steps'?"),
    ("[training]\nsteps = \"ten\"\n", "training.steps = 'ten' is not allowed: expected an integer"),
    ("[training]\nsteps = 1.5\n", "expected an integer"),
    ("[optim]\nnesterov = 1\n", "expected true or false"),
    ("[precision]\ndtype = \"fp8\"\n", "expected 'fp32' | 'bf16' | 'fp16'"),
    ("[optim]\nbetas = [0.9, \"x\"]\n", "expected a number"),
    ("[training]\nsteps = 0\n", "training.steps must be > 0"),
    ("[training]\nmicro_batch_size = 3\nglobal_batch_size = 8\n", "is not a multiple of"),
    ("[model]\nn_embd = 100\nn_head = 3\n", "must be divisible by model.n_head"),
    ("[data]\nval_fraction = 1.5\n", "data.val_fraction must be between 0 and 1"),
    ("[data]\nvocab_size = 100\n", "data.vocab_size must be >= 300"),
    ("[optim]\nbetas = [0.9]\n", "optim.betas must be two numbers"),
    ("[model]\nn_layer = 2\n[parallel]\npipeline_stages = 3\n", "exceeds model.n_layer"),
    ("[model]\nn_layer = 4\n[parallel]\npipeline_stages = 2\nstage_layers = [1, 2]\n",
     "must be positive and sum to model.n_layer (4)"),
    ("[training\nsteps = 1\n", "invalid TOML"),
    ("run = 3\n", "[run] must be a table"),
])
def test_validation_errors(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load_job(write(tmp_path, text))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="job file not found"):
        load_job(tmp_path / "nope.toml")


def test_overrides_are_typed_by_schema():
    assert parse_override("training.steps=12") == ("training", "steps", 12)
    assert parse_override("optim.lr=1e-3") == ("optim", "lr", 1e-3)
    assert parse_override("optim.nesterov=true") == ("optim", "nesterov", True)
    assert parse_override("run.name=123") == ("run", "name", "123")  # strings stay verbatim
    assert parse_override("run.dir=/tmp/a b=c") == ("run", "dir", "/tmp/a b=c")
    assert parse_override("parallel.stage_layers=[1, 3]") == ("parallel", "stage_layers", [1, 3])
    job = load_job(TINY, ["training.steps=3", "precision.dtype=bf16", "optim.lr=0.5"])
    assert (job.training.steps, job.precision.dtype, job.optim.lr) == (3, "bf16", 0.5)


@pytest.mark.parametrize("text, message", [
    ("steps=3", "expected section.key=value"),
    ("training.steps", "expected section.key=value"),
    ("trainin.steps=3", "did you mean 'training'"),
    ("training.step=3", "did you mean 'steps'"),
    ("training.steps=abc", "expected an integer"),
])
def test_bad_overrides(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_job(TINY, [text])


def test_dump_round_trip():
    job = load_job(TINY, ['run.name=quote " and \\ and \n newline'])
    again = job_from_toml(dump_toml(job))
    assert again == job


def test_cli_errors_are_one_line_exit_2(tmp_path):
    bad = write(tmp_path, "[training]\nstesp = 1\n")
    for args in (["config", bad], ["prepare", bad], ["train", bad],
                 ["config", TINY, "--set", "training.steps=x"], ["config", tmp_path / "none.toml"]):
        p = run(hvdllm(*args), check=False)
        assert p.returncode == 2, p.stderr
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_cli_config_prints_resolved_job():
    p = run(hvdllm("config", TINY, "--set", "training.steps=3"))
    assert "steps = 3" in p.stdout and "[parallel]" in p.stdout
