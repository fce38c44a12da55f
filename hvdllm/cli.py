"""`hvdllm <command> ...`: argument parsing and exit statuses (no other module exits).

Bad input (job files, overrides, paths, layouts) ends as one line on stderr and exit status 2.
A failure during multi-rank training ends every rank (MPI abort), so none is left waiting.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from hvdllm.config import dump_toml, load_job
from hvdllm.errors import UserError
from hvdllm.log import logger, setup_logging, world_rank
from hvdllm.preemption import PREEMPTED_EXIT, Preempted

USAGE_ERRORS = (UserError, FileNotFoundError)


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="TOML job file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a job key (repeatable), typed by the schema")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hvdllm", description="Train Hugging Face causal language models across MPI ranks "
        "(Horovod data parallelism, mpi4py pipeline stages); prepare data, export, launch on Slurm.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved job (defaults and overrides applied)")
    _job_args(p)
    p = sub.add_parser("prepare", help="tokenize the job's corpus into train/val token files")
    _job_args(p)
    p = sub.add_parser("train", help="train on every rank (launch with mpirun/horovodrun/srun)")
    _job_args(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="resume from the run's latest checkpoint, from PATH, or with 'auto' from "
                        "the latest if there is one (else start fresh; for requeued jobs)")
    p.add_argument("--fresh", action="store_true",
                   help="start over in a run directory that holds a run: its checkpoints, "
                        "metrics and events move to RUN_DIR/previous/<time>/ first")
    p = sub.add_parser("memory", help="predict per-rank memory of the job on WORLD ranks (meta device only)")
    _job_args(p)
    p.add_argument("--world", type=int, required=True, help="ranks the job would run on")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where the ranks run")
    p = sub.add_parser("plan", help="rank the job's layouts on a cluster by predicted step time "
                       "and memory (docs/planning.md)")
    _job_args(p)
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, required=True, metavar="G",
                   help="ranks per node: GPUs, or on CPU nodes the ranks you would start")
    p.add_argument("--cluster", required=True, metavar="PRESET|FILE",
                   help="a preset (see docs/planning.md) or a file from hvdllm calibrate")
    p.add_argument("--inter-gbit", type=float, default=0, help="inter-node bandwidth, Gbit/s")
    p.add_argument("--inter-latency-us", type=float, default=0, help="inter-node latency, us")
    p.add_argument("--top", type=int, default=5, help="layouts shown (default 5)")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="share of each rank's memory left free (default 0.1)")
    p.add_argument("--write-job", metavar="FILE", help="write the job with the best layout here")
    p.add_argument("--slurm", metavar="FILE", help="write an sbatch script for the best layout")
    p = sub.add_parser("calibrate", help="measure this machine's rates for hvdllm plan (short "
                       "one-rank runs of the job's model and a 2-rank link probe)")
    _job_args(p)
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="cluster file (JSON)")
    p = sub.add_parser("slurm", help="render an sbatch script for the job (templates in hvdllm/launch/templates)")
    _job_args(p)
    for flag, kind in [("--nodes", int), ("--tasks-per-node", int), ("--gpus-per-node", int),
                       ("--partition", str), ("--time", str)]:
        p.add_argument(flag, type=kind, help=f"overrides slurm.{flag[2:].replace('-', '_')}")
    p.add_argument("--launcher", choices=["srun", "mpirun", "horovodrun"], help="overrides slurm.launcher")
    p.add_argument("-o", "--output", metavar="FILE", help="write the script here (default: stdout)")
    p = sub.add_parser("bench", help="side-by-side throughput: precisions, Horovod vs DDP, pipelines")
    _job_args(p)
    p.add_argument("--out", default="bench", help="output directory (bench.json, bench.md, bench.png)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of the data-parallel rows")
    p.add_argument("--quick", action="store_true", help="fewer rows and steps (about 2 minutes on 2 cores)")
    p.add_argument("--repeats", type=int, default=0, help="launches per configuration (default 3, quick 2)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per launch (default 20, quick 6)")
    p.add_argument("--case-studies", type=int, default=0, metavar="STEPS",
                   help="also train fp32 vs bf16 and SGD vs momentum vs AdamW for STEPS steps each")
    p.add_argument("--data", action="store_true", help="instead: data preparation rows (MB/s, "
                   "tokens/s on 1 and all cores, the tokenizer's own rate, peak memory at 1x and 8x)")
    p.add_argument("--memory", action="store_true", help="instead: per-rank peak memory (measured "
                   "and predicted) and step time of 1, 2 and 4 stages, ZeRO-1 against data "
                   "parallelism, activation checkpointing on and off")
    p.add_argument("--plan", action="store_true", help="instead: the planner's predicted step "
                   "time and memory against measured runs of several layouts (docs/planning.md)")
    p.add_argument("--hosts", type=int, default=0, metavar="N", help="instead: data parallelism "
                   "on N namespace hosts x 1 rank over shaped links, against one host (as root)")
    p.add_argument("--links", default="10gbit,1gbit,200mbit",
                   help="with --hosts: the link speeds, comma-separated tc rates")
    p.add_argument("--tcp-tuned", action="store_true",
                   help="with --hosts: tcp_slow_start_after_idle = 0 in the hosts")
    p = sub.add_parser("export", help="write a Hugging Face model folder from a checkpoint")
    p.add_argument("source", help="run directory (latest checkpoint) or checkpoint directory")
    p.add_argument("out_dir", help="output folder for from_pretrained")
    p = sub.add_parser("generate", help="sample text from an exported model")
    p.add_argument("model_dir")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    return parser


def run(args: argparse.Namespace) -> None:
    if args.command == "config":
        print(dump_toml(load_job(args.job, args.overrides)), end="")
    elif args.command == "prepare":
        from hvdllm.data import prepare
        from hvdllm.data.world import launched_world

        prepare(load_job(args.job, args.overrides), launched_world())  # mpirun: ranks share the work
    elif args.command == "train":
        job = load_job(args.job, args.overrides)  # validated before any rank starts MPI
        from hvdllm.train import train

        train(job, args.resume, args.fresh)
    elif args.command == "memory":
        from hvdllm.train.memory import predict, table

        job = load_job(args.job, args.overrides)
        print(table(predict(job, args.world, args.device), f"{args.job} on {args.world} ranks "
                    f"({args.device})"), end="")
    elif args.command == "plan":
        _plan(args)
    elif args.command == "calibrate":
        from hvdllm.plan.calibrate import calibrate

        calibrate(args.job, args.overrides, Path(args.output))
    elif args.command == "slurm":
        _slurm(args)
    elif args.command == "bench" and args.data:
        from hvdllm.bench.data_prep import data_bench, data_markdown

        print(data_markdown(data_bench(args.job, args.overrides, Path(args.out), args.quick,
                                       args.repeats)), end="")
    elif args.command == "bench" and args.hosts:
        from hvdllm.bench.network import network_bench, network_markdown

        print(network_markdown(network_bench(
            args.job, args.overrides, Path(args.out), args.hosts, args.links.split(","),
            args.quick, args.repeats, args.steps, tuned=args.tcp_tuned)), end="")
    elif args.command == "bench" and args.plan:
        from hvdllm.bench.plan_rows import plan_bench, plan_markdown

        print(plan_markdown(plan_bench(args.job, args.overrides, Path(args.out), args.quick,
                                       args.repeats, args.steps)), end="")
    elif args.command == "bench" and args.memory:
        from hvdllm.bench.memory_rows import memory_bench, memory_markdown

        print(memory_markdown(memory_bench(args.job, args.overrides, Path(args.out), args.quick,
                                           args.repeats, args.steps)), end="")
    elif args.command == "bench":
        from hvdllm.bench import bench, markdown

        print(markdown(bench(args.job, args.overrides, Path(args.out), args.ranks, args.quick,
                             args.repeats, args.steps, case_steps=args.case_studies)), end="")
    elif args.command == "export":
        from hvdllm.export import export

        export(args.source, args.out_dir)
    elif args.command == "generate":
        from hvdllm.export import generate

        print(generate(args.model_dir, args.prompt, args.max_new_tokens, args.temperature, args.seed))


def _plan(args: argparse.Namespace) -> None:
    from hvdllm.plan import load_cluster, make_plan, plan_text, with_links

    job = load_job(args.job, args.overrides)
    cluster = with_links(load_cluster(args.cluster), args.inter_gbit, args.inter_latency_us)
    p = make_plan(job, cluster, args.nodes, args.gpus_per_node, args.headroom)
    print(plan_text(p, args.top), end="")
    best = p.ranked[0].candidate
    if args.write_job:
        Path(args.write_job).write_text(dump_toml(load_job(args.job, [*args.overrides, *best.sets()])))
        print(f"wrote {args.write_job}", file=sys.stderr)
    if args.slurm:
        from hvdllm.launch.slurm import SlurmOptions, render

        sets = [*args.overrides, *best.sets()]
        job = load_job(args.job, sets)
        SlurmOptions(nodes=args.nodes, tasks_per_node=args.gpus_per_node,
                     gpus_per_node=args.gpus_per_node if cluster.device == "cuda" else 0
                     ).apply(job.slurm)
        Path(args.slurm).write_text(render(job, Path(args.job), sets))
        print(f"wrote {args.slurm}: sbatch {args.slurm}", file=sys.stderr)


def _slurm(args: argparse.Namespace) -> None:
    from pathlib import Path

    from hvdllm.launch.slurm import SlurmOptions, render

    job = load_job(args.job, args.overrides)
    SlurmOptions(nodes=args.nodes, tasks_per_node=args.tasks_per_node, gpus_per_node=args.gpus_per_node,
                 partition=args.partition, time=args.time, launcher=args.launcher).apply(job.slurm)
    script = render(job, Path(args.job), args.overrides)
    if job.slurm.gpu_memory_gb > 0:
        _warn_if_too_big(job)
    job.run_dir.mkdir(parents=True, exist_ok=True)  # Slurm opens the job's log files there
    if args.output:
        Path(args.output).write_text(script)
        print(f"wrote {args.output}: sbatch {args.output}", file=sys.stderr)
    else:
        print(script, end="")


def _warn_if_too_big(job) -> None:
    """One line on stderr when the predicted per-rank peak exceeds slurm.gpu_memory_gb."""
    from hvdllm.train.memory import predict

    world = job.slurm.nodes * job.slurm.tasks_per_node
    peak = max(r.predicted_peak for r in predict(job, world, "cuda")) / 2**30
    if peak > job.slurm.gpu_memory_gb:
        print(f"hvdllm slurm: warning: predicted per-rank peak {peak:.1f} GiB does not fit "
              f"slurm.gpu_memory_gb = {job.slurm.gpu_memory_gb:g} (see hvdllm memory)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        run(args)
    except USAGE_ERRORS as e:
        _fail(args, f"hvdllm {args.command}: error: {e}", code=2)
    except Preempted as e:  # every rank gets here after the same step: a clean, agreed exit
        logger.info("hvdllm train: %s", e)
        sys.exit(PREEMPTED_EXIT)
    except KeyboardInterrupt:
        _fail(args, f"hvdllm {args.command}: interrupted", code=130)
    except Exception:
        traceback.print_exc()
        _fail(args, f"hvdllm {args.command}: failed on rank {world_rank()} (traceback above)", code=1)
    return 0


def _fail(args: argparse.Namespace, message: str, code: int) -> None:
    print(f"[rank {world_rank()}] {message}" if args.command == "train" else message,
          file=sys.stderr, flush=True)
    if args.command == "train":
        from hvdllm.parallel.topology import abort_world

        abort_world(code)  # the other ranks may be waiting in a collective: end them too
    sys.exit(code)


if __name__ == "__main__":
    sys.exit(main())
