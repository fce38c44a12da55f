"""`hvdllm bench --hosts 2 --links 10gbit,1gbit,200mbit`: data parallelism over a slow network.

Rows, side by side in one run: on this machine's own network (shared memory, "one host") one
rank, then N ranks with Horovod (MPI controller, started by mpirun), Horovod + fp16 and + bf16
compression, Horovod with its Gloo controller (started by horovodrun --gloo) and the torch DDP
peer (gloo); and the same five on N namespace hosts x 1 rank (hvdllm.launch.hosts) for every link speed.
Each launch is a real `hvdllm train` (or the peer), across the hosts through their rsh agent or
ssh stand-in; launches alternate (every place and row once, then again) so drift hits all alike.

Per row: the median step time; what the link adds (the row's step - the same row on one host);
the bytes each rank sends per step (a ring all-reduce sends 2 (N-1)/N of the gradients) and what
they cost at the link's rate; Horovod against DDP; scaling efficiency against one rank (tokens/s
over N x one rank's). Every launch has the same torch threads per rank (training.threads, one
per core / N), so a namespace rank never gets more threads than a one-host rank.

A link is tbf on both ends of each host's veth (hvdllm.launch.netns.shaping: a bucket of 1 ms of
traffic, 50 ms of queue): a switch port of that speed. `tcp_slow_start_after_idle`: the kernel's
default (1) unless `--tcp-tuned`, which sets 0 in the hosts, as tuned clusters do (docs).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from hvdllm.bench.configs import Config
from hvdllm.bench.launcher import run_launch, run_ranks
from hvdllm.bench.runner import launch, run_info, timed_step_s
from hvdllm.config import load_job
from hvdllm.data import prepare
from hvdllm.errors import UserError
from hvdllm.launch.env import free_port, mpi_env
from hvdllm.launch.hosts import namespace_hosts
from hvdllm.launch.netns import rate_bits
from hvdllm.log import logger

ONE_HOST = "one host"
TUNED_SYSCTLS = {"net.ipv4.tcp_slow_start_after_idle": "0"}
"""--tcp-tuned: a connection idle for a step (the gradients' all-reduce is bursty) keeps its
congestion window instead of starting slowly again."""


def network_rows(n: int) -> list[Config]:
    """The rows of one place (one host or one link): N-rank Horovod, + fp16, + bf16, over Gloo,
    DDP."""
    hvd = f"{n} ranks Horovod"
    return [Config(hvd, n), Config(f"{hvd} fp16 compression", n, ["parallel.compression=fp16"]),
            Config(f"{hvd} bf16 compression", n, ["parallel.compression=bf16"]),
            Config(f"{hvd} Gloo", n, controller="gloo"),
            Config(f"{n} ranks torch DDP", n, peer=True)]


def horovodrun(*args: str) -> list[str]:
    """`horovodrun --gloo ARGS...` from the same environment as this process."""
    return [str(Path(sys.executable).parent / "horovodrun"), "--gloo", *args]


def local_start(cfg: Config):
    """A `start(ranks, cmd, what)` for runner.launch on this machine: mpirun, or horovodrun."""
    if cfg.controller != "gloo":
        return run_ranks

    def start(ranks: int, cmd: list[str], what: str):
        return run_launch(horovodrun("-np", str(ranks), "-H", f"localhost:{ranks}", *cmd),
                          mpi_env(), what)
    return start


def hosts_start(hosts, cfg: Config, agent: Path, ssh_dir: Path):
    """A `start(ranks, cmd, what)` for runner.launch inside the first host, one rank per host:
    mpirun through the hosts' rsh agent (the DDP peer's rendezvous and gloo on the hosts'
    interface), or horovodrun --gloo through their ssh stand-in (`ssh_dir`, first on PATH)."""
    def start(ranks: int, cmd: list[str], what: str):
        if ranks != len(hosts):
            raise UserError(f"{what}: {ranks} ranks on {len(hosts)} hosts (one rank each)")
        env = mpi_env(MASTER_ADDR=hosts[0].address, MASTER_PORT=str(free_port()),
                      GLOO_SOCKET_IFNAME=hosts[0].ifname)
        if cfg.controller == "gloo":
            env["PATH"] = f"{ssh_dir}:{env['PATH']}"  # nsenter keeps the environment
            full = hosts[0].command(*horovodrun(
                "-np", str(ranks), "-H", ",".join(f"{h.address}:1" for h in hosts),
                "--network-interface", hosts[0].ifname, *cmd))
        else:
            full = hosts[0].command("mpirun", *hosts.mpirun_args(agent, env=env), *cmd)
        return run_launch(full, env, what)
    return start


def run_place(link: str | None, n: int, tuned: bool, run) -> None:
    """Run every row of one place once: `run(place, cfg, start)` for each; hosts made and
    removed here (a link), or none (one host)."""
    if link is None:
        for cfg in [Config("1 rank", 1), *network_rows(n)]:
            run(ONE_HOST, cfg, local_start(cfg))
        return
    with namespace_hosts(n, rate=link, prefix="hvdb",
                         sysctls=TUNED_SYSCTLS if tuned else None) as hosts:
        agent, ssh_dir = hosts.write_agent(hosts.dir), hosts.write_ssh(hosts.dir / "ssh")
        for cfg in network_rows(n):
            run(link, cfg, hosts_start(hosts, cfg, agent, ssh_dir))


def network_bench(job_path: str, sets: list[str], out: Path, n: int, links: list[str],
                  quick: bool = False, repeats: int = 0, steps: int = 0, warmup: int = 2,
                  tuned: bool = False) -> dict:
    """Every place's rows `repeats` times, alternating; bench-network.json and .md in out."""
    for link in links:  # a bad rate fails before any launch, as one line
        try:
            rate_bits(link)
        except ValueError as e:
            raise UserError(f"--links: {e}") from None
    if n < 2:
        raise UserError(f"--hosts {n}: the network rows need at least 2 hosts")
    job = load_job(job_path, sets)
    repeats, steps = repeats or (1 if quick else 2), steps or (3 if quick else 6)
    threads = job.training.threads or max(1, (os.cpu_count() or 1) // n)
    out.mkdir(parents=True, exist_ok=True)
    prepare(job)
    sets = [*sets, f"data.dir={job.data_dir.resolve()}"]
    times: dict[tuple[str, str], list[float]] = {}
    infos: dict[tuple[str, str], dict] = {}

    def run(place: str, cfg: Config, start) -> None:
        run_dir = out / "runs" / f"{place}-{cfg.name}-{len(times.get((place, cfg.name), []))}" \
            .replace(" ", "_")
        elapsed = launch(cfg, job_path, sets, run_dir, warmup + steps + 1, threads, start)
        times.setdefault((place, cfg.name), []).append(timed_step_s(elapsed, warmup))
        infos[(place, cfg.name)] = run_info(run_dir)
        logger.info("bench --hosts %-9s %-34s %.0f ms/step", place, cfg.name,
                    1000 * times[(place, cfg.name)][-1])

    start = time.time()
    for _ in range(repeats):
        for link in [None, *links]:
            run_place(link, n, tuned, run)
    summary = {"job": job.run.name, "model": f"{job.model.family} {job.model.n_layer}x"
               f"{job.model.n_embd}", "dtype": job.precision.dtype, "hosts": n,
               "threads": threads, "tokens_per_step": job.training.global_batch_size
               * job.data.seq_len, "repeats": repeats, "timed_steps": steps,
               "warmup_steps": warmup, "tcp_tuned": tuned, "links": links}
    summary["rows"] = network_summary(times, infos, summary)
    summary["seconds"] = time.time() - start
    (out / "bench-network.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "bench-network.md").write_text(network_markdown(summary))
    plot_network(summary, out / "bench-network.png")
    return summary


def network_summary(times: dict, infos: dict, s: dict) -> list[dict]:
    """One row per (place, configuration), with what the link adds and the ratios."""
    step = {key: statistics.median(v) for key, v in times.items()}
    one_rank = s["tokens_per_step"] / step[(ONE_HOST, "1 rank")]
    hvd_name = f"{s['hosts']} ranks Horovod"
    payload = infos[(ONE_HOST, hvd_name)].get("allreduce_payload_bytes_rank0", 0)
    rows = []
    for (place, name), step_s in step.items():
        n = 1 if name == "1 rank" else s["hosts"]
        compressed = "compression" in name  # fp16 or bf16: 2 bytes a gradient
        sent = 2 * (n - 1) / n * payload / (2 if compressed else 1)  # DDP: fp32, as Horovod's
        row = {"place": place, "name": name, "step_ms": 1000 * step_s,
               "step_ms_repeats": [1000 * t for t in times[(place, name)]],
               "tokens_per_s": s["tokens_per_step"] / step_s, "sent_bytes_per_rank": sent,
               "efficiency": s["tokens_per_step"] / step_s / (n * one_rank)}
        if place != ONE_HOST:
            row["link_adds_ms"] = 1000 * (step_s - step[(ONE_HOST, name)])
            row["link_theory_ms"] = 1000 * sent * 8 / rate_bits(place)
        ddp = step.get((place, f"{s['hosts']} ranks torch DDP"))
        if "Horovod" in name and ddp:
            row["vs_ddp"] = ddp / step_s
        plain = step.get((place, hvd_name))
        if compressed and place != ONE_HOST and plain:
            plain_adds = plain - step[(ONE_HOST, hvd_name)]
            row["link_share_of_uncompressed"] = (row["link_adds_ms"] / 1000) / plain_adds \
                if plain_adds > 0 else None
        rows.append(row)
    return rows


def network_markdown(s: dict) -> str:
    """bench-network.md: one table, every place's rows."""
    lines = [f"# hvdllm bench --hosts {s['hosts']}: {s['job']} ({s['model']}, {s['dtype']})", "",
             f"{s['tokens_per_step']:,} tokens per step; {s['threads']} torch thread(s) per rank "
             f"everywhere; median of {s['repeats']} alternating launch(es) x {s['timed_steps']} "
             f"timed steps ({s['warmup_steps']} warm-up). Links: tbf on both ends of each host's "
             f"veth; tcp_slow_start_after_idle = {0 if s['tcp_tuned'] else 1}. 'link adds': the "
             "row's step minus the same row on one host; 'compressed share': what the link adds "
             "with fp16 or bf16 compression over what it adds without.", "",
             "| place | configuration | ms/step (repeats) | link adds ms | wire theory ms "
             "| compressed share | vs DDP | efficiency | MB sent/rank |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        def num(key: str, fmt: str) -> str:
            return fmt.format(r[key]) if r.get(key) is not None else "-"
        spread = ", ".join(f"{t:.0f}" for t in r["step_ms_repeats"])
        lines.append(f"| {r['place']} | {r['name']} | {r['step_ms']:.0f} ({spread}) | "
                     f"{num('link_adds_ms', '{:.0f}')} | {num('link_theory_ms', '{:.0f}')} | "
                     f"{num('link_share_of_uncompressed', '{:.2f}')} | {num('vs_ddp', '{:.2f}')} | "
                     f"{r['efficiency']:.2f} | {r['sent_bytes_per_rank'] / 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def plot_network(s: dict, path: Path) -> None:
    """bench-network.png: ms/step of each configuration (a bar) at each place (a group), with
    one host's step + the wire's theoretical time marked on the link groups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    places = [ONE_HOST, *s["links"]]
    names = [r["name"] for r in s["rows"] if r["place"] == ONE_HOST and r["name"] != "1 rank"]
    by = {(r["place"], r["name"]): r for r in s["rows"]}
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(2.2 * len(places) + 2, 4.5))
    for i, name in enumerate(names):
        xs = [p + (i - (len(names) - 1) / 2) * width for p in range(len(places))]
        ys = [by[(place, name)]["step_ms"] for place in places]
        ax.bar(xs, ys, width, label=name)
        for x, place in zip(xs[1:], places[1:]):
            ideal = by[(ONE_HOST, name)]["step_ms"] + by[(place, name)]["link_theory_ms"]
            ax.plot([x - width / 2, x + width / 2], [ideal, ideal], color="black", lw=1)
    one = by[(ONE_HOST, "1 rank")]["step_ms"] / s["hosts"]
    ax.axhline(one, color="grey", ls="--", lw=1, label=f"1 rank's step / {s['hosts']}")
    ax.set_xticks(range(len(places)), [f"{p}\n({s['hosts']} hosts)" if p != ONE_HOST else p
                                       for p in places])
    ax.set_ylabel("ms per step (lower is better)")
    ax.set_title(f"{s['job']}: {s['hosts']} ranks; black ticks: one host + bytes / link rate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
