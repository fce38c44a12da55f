"""The rendered scripts the repository shows: slurm/<example>.sbatch and docs/slurm.md's example.

Each is what `hvdllm slurm` renders in a checkout at /home/you/hvdllm with its virtual environment
in .venv; tests/test_slurm_templates.py checks that they equal a fresh render. After changing a
template or a job file, rewrite the examples with

    .venv/bin/python tests/slurm_examples.py

(docs/slurm.md's example is pasted by hand: the test's message says which command renders it).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from hvdllm.cli import build_parser
from hvdllm.config import load_job
from hvdllm.launch.slurm import SlurmOptions, render

ROOT = Path(__file__).resolve().parent.parent
CHECKOUT = "/home/you/hvdllm"
"""Where the shown scripts were rendered; the tests put the real checkout's path in its place."""
SLURM_DIR = ROOT / "slurm"
EXAMPLES = {
    "gpt2-124m.srun.sbatch":
        "jobs/gpt2-124m.toml --nodes 4 --tasks-per-node 8 --gpus-per-node 8 --launcher srun",
    "llama-1b.mpirun.sbatch":
        "jobs/llama-1b.toml --launcher mpirun --partition gpu --set slurm.cpus_per_task=12",
    "quickstart.horovodrun.sbatch":
        "jobs/quickstart.toml --nodes 2 --tasks-per-node 1 --launcher horovodrun "
        "--set slurm.cpus_per_task=16",
}
"""slurm/NAME: the arguments of the `hvdllm slurm` command that renders it."""
RECIPES = ("elastic.sbatch", "elastic-hosts.sh")
"""slurm/NAME written by hand, not rendered: elastic training in an allocation (docs/elastic.md)."""
DOCS_EXAMPLE = "jobs/gpt2-124m.toml --partition gpu --set slurm.cpus_per_task=12"
"""The arguments behind docs/slurm.md's rendered script."""


def render_shown(arguments: str) -> str:
    """`hvdllm slurm ARGUMENTS` as rendered in CHECKOUT (the job file relative to the checkout)."""
    args = build_parser().parse_args(["slurm", *shlex.split(arguments)])
    job = load_job(ROOT / args.job, args.overrides)
    SlurmOptions(nodes=args.nodes, tasks_per_node=args.tasks_per_node,
                 gpus_per_node=args.gpus_per_node, partition=args.partition, time=args.time,
                 launcher=args.launcher).apply(job.slurm)
    job.slurm.hvdllm = str(ROOT / ".venv" / "bin" / "hvdllm")
    text = render(job, ROOT / args.job, args.overrides, workdir=ROOT)
    return text.replace(str(ROOT), CHECKOUT)


def write_examples() -> None:
    """Rewrite slurm/<example>.sbatch from the current templates and job files."""
    for name, arguments in EXAMPLES.items():
        (SLURM_DIR / name).write_text(render_shown(arguments))
        print(f"wrote slurm/{name}: hvdllm slurm {arguments}")


if __name__ == "__main__":
    write_examples()
