"""Loading a job: TOML read with tomllib, --set overrides typed by the schema, validation.

Nothing here executes code from the file: values are parsed by tomllib and checked against the
types declared in schema.py. Bad input is a ConfigError: one line naming the key and what is
allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

from hvdllm.config.schema import SECTIONS, ConfigError, JobConfig
from hvdllm.errors import UserError
from hvdllm.layout import check_batch_settings


# --------------------------------------------------------------------------------------------
# Type checking of values against the declared field types
# --------------------------------------------------------------------------------------------

def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return value as type tp, or raise ConfigError naming the key and what is allowed."""
    origin = typing.get_origin(tp)
    ok = False
    if origin is Literal:
        ok = value in typing.get_args(tp)
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(v, typing.get_args(tp)[0], key) for v in value]
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{key} = {value!r} is not allowed: expected {_describe(tp)}")
    return value


def _unknown(kind: str, name: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(valid)}"
    return ConfigError(f"{where}unknown {kind} {name!r}{hint}")


def _build(raw: dict[str, Any], where: str) -> JobConfig:
    job = JobConfig()
    for section, values in raw.items():
        if section not in SECTIONS:
            raise _unknown("section", section, list(SECTIONS), where)
        if not isinstance(values, dict):
            raise ConfigError(f"{where}[{section}] must be a table")
        obj = getattr(job, section)
        hints = typing.get_type_hints(type(obj))
        for key, value in values.items():
            if key not in hints:
                raise _unknown(f"key in [{section}]", key, list(hints), where)
            setattr(obj, key, _coerce(value, hints[key], f"{where}{section}.{key}"))
    return job


# --------------------------------------------------------------------------------------------
# Loading, overriding, validating
# --------------------------------------------------------------------------------------------

def parse_override(text: str) -> tuple[str, str, Any]:
    """Split "section.key=value" and type the value by the schema (strings stay verbatim)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    path, value_text = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    if section not in SECTIONS:
        raise _unknown("section", section, list(SECTIONS), "--set: ")
    hints = typing.get_type_hints(SECTIONS[section])
    if key not in hints:
        raise _unknown(f"key in [{section}]", key, list(hints), "--set: ")
    tp = hints[key]
    if tp is str or (typing.get_origin(tp) is Literal and isinstance(typing.get_args(tp)[0], str)):
        return section, key, value_text
    try:
        value = tomllib.loads(f"v = {value_text}")["v"]
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"--set {path}={value_text}: expected {_describe(tp)}") from None
    return section, key, value


def load_job(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """Read a TOML job file, apply --set overrides and validate the result."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"job file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); a job file is TOML") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})[key] = value
    job = _build(raw, f"{path}: ")
    validate(job)
    return job


def job_from_toml(text: str) -> JobConfig:
    """Rebuild a job from the TOML written by dump_toml (checkpoints, run directories)."""
    job = _build(tomllib.loads(text), "")
    validate(job)
    return job


MAX_STEPS = 99_999_999
"""Checkpoint directories carry the step in 8 digits."""

LIMITS = [
    ("training", "steps", MAX_STEPS, "checkpoint names carry the step in 8 digits"),
    ("data", "vocab_size", 2 ** 32, "tokens are stored as uint32 at most"),
    ("data", "seq_len", 2 ** 20, "no model here has a context that long"),
    ("model", "n_layer", 10_000, "no model has that many layers"),
    ("model", "n_embd", 2 ** 20, "no model is that wide"),
    ("training", "global_batch_size", 2 ** 31 - 1, "the batch index would overflow"),
]
"""Numbers no run could reach, refused up front instead of failing deep inside a step."""


def validate(job: JobConfig) -> None:
    """Cross-field checks that do not depend on the world size (hvdllm.layout.plan does those)."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    for section, name in [("training", "steps"),
                          ("training", "global_batch_size"), ("training", "log_every"),
                          ("data", "seq_len"), ("data", "vocab_size"), ("model", "n_layer"),
                          ("model", "n_embd"), ("model", "n_head"),
                          ("parallel", "pipeline_stages"), ("parallel", "elastic_commit_every")]:
        need(getattr(getattr(job, section), name) > 0, f"{section}.{name} must be > 0")
    for section, name in [("training", "eval_every"), ("training", "checkpoint_every"),
                          ("optim", "warmup_steps"), ("training", "threads"),
                          ("parallel", "micro_batches"), ("training", "grad_clip"),
                          ("parallel", "peer_timeout_s")]:
        need(getattr(getattr(job, section), name) >= 0, f"{section}.{name} must be >= 0")
    need(job.training.keep_checkpoints >= 1, "training.keep_checkpoints must be >= 1")
    need(job.training.checkpoint_every_blocks >= 1, "training.checkpoint_every_blocks must be >= 1")
    need(job.training.profile_start_step >= 1, "training.profile_start_step must be >= 1")
    need(job.training.profile_steps >= 1, "training.profile_steps must be >= 1")
    need(job.training.pipeline_chart_every >= 0, "training.pipeline_chart_every must be >= 0")
    need(not (job.training.profile or job.parallel.horovod_timeline)
         or job.training.profile_start_step <= job.training.steps,
         f"training.profile_start_step ({job.training.profile_start_step}) is after the last step "
         f"({job.training.steps}): nothing would be profiled")
    for section, name, limit, why in LIMITS:
        need(getattr(getattr(job, section), name) <= limit,
             f"{section}.{name} = {getattr(getattr(job, section), name)} is over {limit:,}: {why}")
    need(0 < job.data.val_fraction < 1, "data.val_fraction must be between 0 and 1")
    need(job.data.vocab_size >= 300, "data.vocab_size must be >= 300 (256 bytes + merges)")
    need(job.optim.lr > 0, "optim.lr must be > 0")
    need(len(job.optim.betas) == 2 and all(0 <= b < 1 for b in job.optim.betas),
         "optim.betas must be two numbers in [0, 1)")
    need(0 <= job.optim.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]")
    need(job.model.n_embd % job.model.n_head == 0,
         f"model.n_embd ({job.model.n_embd}) must be divisible by model.n_head ({job.model.n_head})")
    kv = job.model.n_kv_head or job.model.n_head
    need(job.model.n_head % kv == 0, "model.n_head must be a multiple of model.n_kv_head")
    need(0 <= job.model.dropout < 1, "model.dropout must be in [0, 1)")
    need(job.model.sliding_window >= 0, "model.sliding_window must be >= 0")
    need(job.parallel.zero in (0, 1), f"parallel.zero = {job.parallel.zero}: expected 0 or 1")
    need(not job.model.sliding_window or job.model.family in ("mistral", "qwen2"),
         f"model.sliding_window is for mistral and qwen2, not {job.model.family}")
    need(not job.model.tie_embeddings or job.model.family != "gpt2",
         "model.tie_embeddings is for the Llama-likes; GPT-2 always ties its head")
    try:
        check_batch_settings(job.training.global_batch_size, job.training.micro_batch_size,
                             job.parallel.micro_batches)
    except UserError as e:
        raise ConfigError(str(e)) from None
    if job.parallel.stage_layers:
        need(len(job.parallel.stage_layers) == job.parallel.pipeline_stages,
             "parallel.stage_layers must list one layer count per pipeline stage")
        need(sum(job.parallel.stage_layers) == job.model.n_layer and min(job.parallel.stage_layers) > 0,
             f"parallel.stage_layers must be positive and sum to model.n_layer ({job.model.n_layer})")
    need(job.parallel.pipeline_stages <= job.model.n_layer,
         f"parallel.pipeline_stages ({job.parallel.pipeline_stages}) exceeds model.n_layer "
         f"({job.model.n_layer}): every stage needs at least one layer")


# --------------------------------------------------------------------------------------------
# Writing a resolved job back out
# --------------------------------------------------------------------------------------------

def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # JSON string escapes are valid TOML


def dump_toml(job: JobConfig) -> str:
    """The fully resolved job as TOML (every key, defaults included)."""
    lines: list[str] = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for f in dataclasses.fields(getattr(job, section)):
            lines.append(f"{f.name} = {toml_value(getattr(getattr(job, section), f.name))}")
        lines.append("")
    return "\n".join(lines)
