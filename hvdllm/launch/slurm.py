"""`hvdllm slurm`: render an sbatch script for a job from the templates shipped in the package.

hvdllm/launch/templates/common.sbatch is the script every launcher shares (header, signal
forwarding, requeue, log paths); <launcher>.part holds that launcher's own parts (the launch
command and the comments that explain it), which fill common.sbatch's part placeholders. Values
fill the rest.

Every value that reaches the script is validated here and quoted for where it lands:
  * #SBATCH lines are read by sbatch, not bash: sbatch splits them on blanks, honours "..." and
    '...', and treats a backslash as an escape even inside quotes. Values there are therefore put in
    double quotes with backslashes and double quotes escaped (`sbatch_quote`), and Slurm's %-patterns
    in file names are escaped (`%` -> `%%`) except the `%j` we add.
  * The shell body gets `shlex.quote`d words only; nothing from the job file is shell code.
Control characters (newlines above all) are rejected everywhere: a value can never start a line.
Node and task counts are written once, in the #SBATCH lines; the body reads them from Slurm.
"""

from __future__ import annotations

import re
import shlex
import string
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from hvdllm.config import ConfigError, JobConfig, SlurmConfig
from hvdllm.layout import LayoutError, job_layout

TEMPLATES = resources.files("hvdllm.launch") / "templates"
"""Package data: common.sbatch and one <launcher>.part per launcher (see setup.cfg)."""
COMMON = "common.sbatch"

LAUNCHERS = ("srun", "mpirun", "horovodrun")
MAX_SIGNAL_SECONDS = 65535
"""Slurm keeps --signal's time in 16 bits."""

# Options the templates set themselves; [slurm] sbatch entries may not set them a second time.
RENDERED_OPTIONS = {
    "--job-name": "run.name", "-J": "run.name", "--nodes": "slurm.nodes", "-N": "slurm.nodes",
    "--ntasks-per-node": "slurm.tasks_per_node", "--ntasks": "slurm.nodes x slurm.tasks_per_node",
    "-n": "slurm.nodes x slurm.tasks_per_node", "--gpus-per-node": "slurm.gpus_per_node",
    "--cpus-per-task": "slurm.cpus_per_task", "-c": "slurm.cpus_per_task", "--time": "slurm.time",
    "-t": "slurm.time", "--partition": "slurm.partition", "-p": "slurm.partition",
    "--account": "slurm.account", "-A": "slurm.account", "--output": "run.dir", "-o": "run.dir",
    "--error": "run.dir", "-e": "run.dir", "--signal": "slurm.signal_seconds",
    "--requeue": "the template", "--no-requeue": "the template", "--open-mode": "the template",
    "--chdir": "the directory you render in", "-D": "the directory you render in",
}

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PLAIN = re.compile(r"[\w@%+=:,./-]+", re.ASCII)
"""Values that need no quotes, in an #SBATCH line or in the shell."""
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TIME = re.compile(r"(?:(?P<days>\d+)-)?(?P<hms>\d+(?::\d+){0,2})")
_PART_START = re.compile(r"#@ ([a-z_]+)")
"""The line that starts a part in a <launcher>.part file."""


class _Template(string.Template):
    """{{name}} placeholders, so the shell's own $VARS need no escaping; a bad one is an error."""
    delimiter = "{{"
    pattern = r"\{\{(?:(?P<named>[a-z_]+)\}\}|(?P<braced>(?!))|(?P<escaped>(?!))|(?P<invalid>))"


@dataclass(frozen=True)
class SlurmOptions:
    """The [slurm] section with the command-line flags applied (None: keep the job's value)."""
    nodes: int | None = None
    tasks_per_node: int | None = None
    gpus_per_node: int | None = None
    partition: str | None = None
    time: str | None = None
    launcher: str | None = None

    def apply(self, slurm: SlurmConfig) -> None:
        for name, value in vars(self).items():
            if value is not None:
                setattr(slurm, name, value)


# --------------------------------------------------------------------------------------------
# Validation: one line per problem, raised as ConfigError
# --------------------------------------------------------------------------------------------

def check_text(key: str, value: str) -> str:
    """A value that may be rendered: any text but control characters (which could start a line)."""
    if _CONTROL.search(value):
        raise ConfigError(f"{key} = {value!r}: control characters (newlines, tabs) are not allowed")
    return value


def time_seconds(text: str) -> int:
    """Seconds in a Slurm time limit: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S."""
    m = _TIME.fullmatch(text.strip())
    if not m:
        raise ConfigError(f"slurm.time = {text!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    fields = [int(f) for f in m["hms"].split(":")]
    if m["days"] is None:  # M, M:S or H:M:S
        hours, minutes, seconds = {1: [0, fields[0], 0], 2: [0, *fields], 3: fields}[len(fields)]
    else:                  # D-H, D-H:M or D-H:M:S
        hours, minutes, seconds = (fields + [0, 0])[:3]
    return int(m["days"] or 0) * 86400 + hours * 3600 + minutes * 60 + seconds


def validate_slurm(job: JobConfig) -> None:
    """Check the [slurm] section and that its layout fits the job (batch sizes, stages)."""
    s = job.slurm
    for name in ("nodes", "tasks_per_node"):
        if getattr(s, name) < 1:
            raise ConfigError(f"slurm.{name} must be >= 1")
    for name in ("gpus_per_node", "cpus_per_task"):
        if getattr(s, name) < 0:
            raise ConfigError(f"slurm.{name} must be >= 0")
    if s.launcher not in LAUNCHERS:
        raise ConfigError(f"slurm.launcher = {s.launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    if s.gpus_per_node and s.tasks_per_node != s.gpus_per_node:
        raise ConfigError(f"slurm.tasks_per_node ({s.tasks_per_node}) must equal slurm.gpus_per_node "
                          f"({s.gpus_per_node}): one rank per GPU")
    limit = time_seconds(s.time)
    if limit <= 0:
        raise ConfigError(f"slurm.time = {s.time!r} must be longer than zero")
    if not 0 < s.signal_seconds < min(limit, MAX_SIGNAL_SECONDS + 1):
        raise ConfigError(f"slurm.signal_seconds ({s.signal_seconds}) must be > 0 and shorter than "
                          f"the time limit ({limit} s) and at most {MAX_SIGNAL_SECONDS}")
    for key, value in [("run.name", job.run.name), ("run.dir", str(job.run_dir)),
                       ("slurm.partition", s.partition), ("slurm.account", s.account),
                       ("slurm.hvdllm", s.hvdllm)]:
        check_text(key, value)
    if "\\" in str(job.run_dir):
        raise ConfigError(f"run.dir = {str(job.run_dir)!r}: Slurm log paths cannot contain a backslash")
    _check_lists(s)
    _check_layout(job)


def _check_lists(s: SlurmConfig) -> None:
    for option in s.sbatch:
        check_text("slurm.sbatch", option)
        option = option.strip()
        name = re.split(r"[=\s]", option, maxsplit=1)[0] if option.startswith("--") else option[:2]
        if not name.startswith("-"):
            raise ConfigError(f"slurm.sbatch entry {option!r} must be an option such as --mem=0")
        if name in RENDERED_OPTIONS:
            raise ConfigError(f"slurm.sbatch entry {option!r}: {name} is set from "
                              f"{RENDERED_OPTIONS[name]}; set it there")
    for module in s.modules:
        check_text("slurm.modules", module)
    for pair in s.env:
        check_text("slurm.env", pair)
        if not _ENV_NAME.fullmatch(pair.split("=", 1)[0]) or "=" not in pair:
            raise ConfigError(f"slurm.env entry {pair!r} must be NAME=value")


def _check_layout(job: JobConfig) -> None:
    """The world the script will start must be usable by the job, before it waits in a queue."""
    s, stages = job.slurm, job.parallel.pipeline_stages
    world = s.nodes * s.tasks_per_node
    where = f"slurm: {s.nodes} node(s) x {s.tasks_per_node} task(s) = {world} ranks: "
    if s.launcher == "horovodrun" and stages > 1:
        raise ConfigError(f"{where}pipeline stages need MPI; use launcher srun or mpirun, "
                          f"not horovodrun (Gloo)")
    try:
        job_layout(job, world)  # the same rule `hvdllm train` applies on start
    except LayoutError as e:
        raise ConfigError(where + str(e)) from None


# --------------------------------------------------------------------------------------------
# Quoting and rendering
# --------------------------------------------------------------------------------------------

def sbatch_quote(value: str) -> str:
    """Quote one value for an #SBATCH line (sbatch's parser, not bash's: see the module doc)."""
    if _PLAIN.fullmatch(check_text("value", value)):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def slurm_path(path: Path) -> str:
    """A path for --output/--error: Slurm expands %-patterns there, so a literal % is %%."""
    return str(path).replace("%", "%%")


def installed(command: str) -> str:
    """This installation's script (next to the interpreter), else the bare name for PATH."""
    script = Path(sys.executable).absolute().parent / command
    return str(script) if script.is_file() else command


def template_values(job: JobConfig, job_file: Path, overrides: Sequence[str], workdir: Path
                    ) -> dict[str, str]:
    """Every placeholder's text, already quoted for where it goes."""
    s = job.slurm
    run_dir = job.run_dir if job.run_dir.is_absolute() else workdir / job.run_dir
    job_file = job_file if job_file.is_absolute() else workdir / job_file
    hvdllm = s.hvdllm or installed("hvdllm")
    sets = "".join(f" --set {shlex.quote(check_text('--set', o))}" for o in overrides
                   if not o.strip().startswith("slurm."))  # those only shape this script
    if s.cpus_per_task and not job.training.threads and not s.gpus_per_node:
        sets += ' --set "training.threads=${SLURM_CPUS_PER_TASK}"'  # read back, not repeated
    return {
        "launcher": s.launcher,  # one of LAUNCHERS (validated): plain text anywhere
        "job_name": sbatch_quote(job.run.name),
        "nodes": str(s.nodes),
        "tasks_per_node": str(s.tasks_per_node),
        "time": sbatch_quote(s.time.strip()),
        "output": sbatch_quote(slurm_path(run_dir) + "/slurm-%j.out"),
        "error": sbatch_quote(slurm_path(run_dir) + "/slurm-%j.err"),
        "workdir": sbatch_quote(str(workdir)),
        "signal_seconds": str(s.signal_seconds),
        "more_sbatch": "\n".join(f"#SBATCH {line}" for line in _more_sbatch(s)),
        "hvdllm": shlex.quote(hvdllm),
        "horovodrun": shlex.quote(str(Path(hvdllm).parent / "horovodrun") if "/" in hvdllm
                                  else "horovodrun"),  # from the same installation as hvdllm
        "job_file": shlex.quote(str(job_file)),
        "run_dir": shlex.quote(str(run_dir)),
        "overrides": sets,
        "modules": "\n".join(f"module load {shlex.quote(m)}" for m in s.modules)
                   or "# (no environment modules: [slurm] modules)",
        "environment": _environment(s),
    }


def _more_sbatch(s: SlurmConfig) -> list[str]:
    lines = [f"--partition={sbatch_quote(s.partition)}"] if s.partition else []
    lines += [f"--account={sbatch_quote(s.account)}"] if s.account else []
    lines += [f"--gpus-per-node={s.gpus_per_node}"] if s.gpus_per_node else []
    lines += [f"--cpus-per-task={s.cpus_per_task}"] if s.cpus_per_task else []
    return lines + [sbatch_quote(option) for option in s.sbatch]


def _environment(s: SlurmConfig) -> str:
    lines = []
    for pair in s.env:
        name, value = pair.split("=", 1)
        lines.append(f"export {name}={shlex.quote(value)}")
    if not s.gpus_per_node:
        lines.append("# CPU-only nodes: MPI's progress engine yields the core it would spin on "
                     "(~30 % faster on CPU)")
        lines.append("export OMPI_MCA_mpi_yield_when_idle=1")
    return "\n".join(lines)


def render(job: JobConfig, job_file: Path, overrides: Sequence[str] = (),
           workdir: Path | None = None) -> str:
    """The sbatch script for a validated job: the launcher's template with its values filled in."""
    validate_slurm(job)
    workdir = (workdir or Path.cwd()).absolute()
    check_text("working directory", str(workdir))
    values = template_values(job, Path(job_file), overrides, workdir)
    template = launcher_template(job.slurm.launcher, values)
    try:
        return _Template(template).substitute(values)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{TEMPLATES}: unknown or malformed placeholder {e} in {COMMON} or "
                          f"{job.slurm.launcher}.part") from None


# --------------------------------------------------------------------------------------------
# Templates: common.sbatch + <launcher>.part, package data
# --------------------------------------------------------------------------------------------

def template_text(name: str) -> str:
    """One template file from the installed package (hvdllm/launch/templates/NAME)."""
    try:
        return (TEMPLATES / name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"template {TEMPLATES / name} not found: this hvdllm was installed "
                          f"without its package data; reinstall it") from None


def placeholders(text: str) -> set[str]:
    """The {{name}} placeholders in a template."""
    return {m["named"] for m in _Template.pattern.finditer(text) if m["named"]}


def parse_parts(text: str, source: str) -> dict[str, str]:
    """A <launcher>.part file: each `#@ NAME` line starts the text of part NAME (lines before the
    first one describe the file and are not rendered)."""
    parts: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        start = _PART_START.fullmatch(line)
        if start and start[1] in parts:
            raise ConfigError(f"{source}: part {start[1]!r} is defined twice")
        if start:
            name = start[1]
            parts[name] = []
        elif name is not None:
            parts[name].append(line)
    return {name: "\n".join(lines) for name, lines in parts.items()}


def launcher_template(launcher: str, values: Iterable[str]) -> str:
    """common.sbatch with the launcher's parts in place and the values' placeholders still open.

    The parts go in first and the values after, in one pass each: text from a value is never
    read as a placeholder."""
    common, source = template_text(COMMON), f"{TEMPLATES / launcher}.part"
    parts = parse_parts(template_text(f"{launcher}.part"), source)
    wanted = placeholders(common) - set(values)
    if set(parts) != wanted:
        missing, unknown = sorted(wanted - set(parts)), sorted(set(parts) - wanted)
        raise ConfigError(f"{source}: parts must be exactly those {COMMON} places "
                          f"(missing: {', '.join(missing) or 'none'}; "
                          f"unknown: {', '.join(unknown) or 'none'})")
    return _Template(common).safe_substitute(parts)
