"""What the planner knows about a cluster: devices, their rates, the links between them.

A Cluster comes from a preset (datasheet numbers for common GPU nodes, with an assumed share of
the peak that training reaches) or from a calibration file that `hvdllm calibrate` wrote on the
machine itself (measured rates: the only way to plan CPU ranks, whose speed depends on the cores
they share). Every number says where it came from, and the plan prints it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hvdllm.errors import UserError

GB = 1e9


@dataclass(frozen=True)
class Link:
    """A latency-bandwidth model of one kind of transfer: seconds = latency_s + bytes / bytes_per_s."""
    latency_s: float
    bytes_per_s: float

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


@dataclass(frozen=True)
class Rates:
    """Compute time of one rank: measured pieces (calibration) or a FLOP-rate formula (presets)."""
    flop_s: float = 0.0
    """Seconds per training FLOP of forward + backward (6 x matmul weights per token + attention)."""
    layer_s: float = 0.0
    """Seconds per decoder block per micro-batch besides its FLOPs (kernel launches)."""
    param_s: float = 0.0
    """Seconds per parameter per optimizer step (gradient norm, clipping, the step itself)."""
    step_s: float = 0.0
    """Seconds per step outside the pieces: data, loss averaging, logging, metrics, the loop."""
    pieces: dict[str, list[list[float]]] = field(default_factory=dict)
    """Measured forward + backward seconds by micro-batch tokens, [[tokens, s], ...], of "block",
    "block_checkpointed", "embed" and "head" (hvdllm.plan.measure); empty: use flop_s."""

    def piece_s(self, piece: str, tokens: float) -> float:
        """A piece's seconds at `tokens`: linear between measured points, proportional beyond."""
        points = sorted(self.pieces[piece])
        if tokens <= points[0][0]:
            return points[0][1] * tokens / points[0][0]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if tokens <= x1:
                return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
        return points[-1][1] * tokens / points[-1][0]


@dataclass
class Cluster:
    """A cluster's devices and links as the cost model uses them."""
    name: str
    device: str
    """"cuda" (one rank per GPU) or "cpu" (ranks share a node's cores)."""
    devices_per_node: int
    """GPUs per node; on CPU nodes the cores per node."""
    device_memory_bytes: float
    """Memory per GPU; on CPU nodes the node's memory (shared by its ranks)."""
    peak_tflops: float
    """MFU's denominator: dense bf16 peak per GPU (datasheet), or per core on CPU nodes (measured)."""
    rates: dict[int, Rates]
    """Compute rates by threads per rank (GPUs: one entry, key 0)."""
    allreduce_intra: Link
    """One step of a ring collective between ranks of one node."""
    allreduce_inter: Link
    """One step of a ring collective that crosses nodes (the ring's slowest hop)."""
    p2p_intra: Link
    """A pipeline message between ranks of one node."""
    p2p_inter: Link
    """A pipeline message between nodes."""
    overlap: float
    """Share of the last micro-batch's backward that hides the gradient exchange (0: none)."""
    source: str
    """Where the numbers come from: a preset's datasheet and assumptions, or a calibration run."""
    fp32_slowdown: float = 1.0
    """How much slower an fp32 job's FLOPs run than the rates' (a preset's bf16 / FP32 peak;
    1 for a calibration, which measures the job's own dtype)."""
    calibrated_model: str = ""
    """For a calibration: the block shape it timed (model_shape()); other shapes are refused."""
    notes: list[str] = field(default_factory=list)

    def rates_for(self, threads: int) -> Rates:
        """The rates of a rank with `threads` threads: the largest calibrated count <= threads."""
        if self.device == "cuda":
            return next(iter(self.rates.values()))
        known = sorted(self.rates)
        return self.rates[max([k for k in known if k <= max(threads, known[0])])]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def cluster_from_json(text: str, where: str) -> Cluster:
    """A Cluster from to_json()'s text; a file that is not one is one line of UserError."""
    try:
        raw = json.loads(text)
        links = {k: Link(**raw.pop(k)) for k in ("allreduce_intra", "allreduce_inter",
                                                 "p2p_intra", "p2p_inter")}
        rates = {int(k): Rates(**v) for k, v in raw.pop("rates").items()}
        return Cluster(rates=rates, **links, **raw)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{where}: not a cluster description written by hvdllm calibrate "
                        f"({type(e).__name__}: {e})") from None


def _gpu_node(name: str, gpus: int, memory_gib: float, gpu: str, hbm_tb_s: float,
              intra_gb_s: float, inter_gb_s: float, datasheet: str) -> Cluster:
    """A GPU node preset: training reaches EFFICIENCY of the dense bf16 peak (hvdllm.metrics'
    datasheet table, like MFU); fp32 jobs run at the plain FP32 rate (TF32 is left off); the
    optimizer step moves 28 bytes per parameter (read weight, gradient, two moments; write
    three) at HBM speed."""
    from hvdllm.metrics import DATASHEET_TFLOPS

    efficiency, rates = 0.45, DATASHEET_TFLOPS[gpu]
    bf16 = rates["bf16"]
    return Cluster(
        name=name, device="cuda", devices_per_node=gpus, device_memory_bytes=memory_gib * 2**30,
        peak_tflops=bf16, fp32_slowdown=bf16 / rates["fp32"],
        rates={0: Rates(flop_s=1 / (bf16 * 1e12 * efficiency), layer_s=150e-6,
                        param_s=28 / (hbm_tb_s * 1e12))},
        allreduce_intra=Link(8e-6, intra_gb_s * GB), allreduce_inter=Link(15e-6, inter_gb_s * GB),
        p2p_intra=Link(10e-6, intra_gb_s * GB), p2p_inter=Link(20e-6, inter_gb_s * GB),
        overlap=0.8, source=f"preset {name}: {datasheet}",
        notes=[f"assumed: training matmuls reach {efficiency:.0%} of the dense bf16 peak "
               f"({bf16:g} TFLOP/s; fp32 jobs {bf16 / rates['fp32']:.0f}x slower, TF32 off); "
               f"150 us per block per micro-batch of launches; all-reduce hidden behind 80 % of "
               f"the last backward"])


PRESETS = {
    "a100-80g-8x-ib200": lambda: _gpu_node(
        "a100-80g-8x-ib200", 8, 80, "A100", 2.0, 240, 25,
        "A100 SXM 80 GB, 312 TFLOP/s dense bf16, 2.0 TB/s HBM, NVLink 3 (~240 GB/s per GPU "
        "achieved), one 200 Gbit/s InfiniBand port per GPU"),
    "h100-80g-8x-ib400": lambda: _gpu_node(
        "h100-80g-8x-ib400", 8, 80, "H100", 3.35, 360, 50,
        "H100 SXM 80 GB, 989 TFLOP/s dense bf16, 3.35 TB/s HBM, NVLink 4 (~360 GB/s per GPU "
        "achieved), one 400 Gbit/s InfiniBand port per GPU"),
    "h200-141g-8x-ib400": lambda: _gpu_node(
        "h200-141g-8x-ib400", 8, 131, "H200", 4.8, 360, 50,
        "H200 SXM 141 GB, 989 TFLOP/s dense bf16, 4.8 TB/s HBM, NVLink 4, one 400 Gbit/s "
        "InfiniBand port per GPU"),
    "l40s-48g-4x-eth100": lambda: _gpu_node(
        "l40s-48g-4x-eth100", 4, 44.7, "L40S", 0.864, 20, 10,
        "L40S 48 GB, 362 TFLOP/s dense bf16, 864 GB/s GDDR6, PCIe 4 between GPUs, 100 Gbit/s "
        "Ethernet per node shared by 4 GPUs (~10 GB/s each on the ring)"),
}
"""Datasheet node presets by name."""


def load_cluster(spec: str) -> Cluster:
    """A preset name or a calibration file's path."""
    if spec in PRESETS:
        return PRESETS[spec]()
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--cluster {spec}: neither a preset ({', '.join(PRESETS)}) nor a file; "
                        f"on CPU nodes write one with `hvdllm calibrate JOB -o FILE`")
    return cluster_from_json(path.read_text(), str(path))


def with_links(cluster: Cluster, inter_gbit: float = 0, inter_latency_us: float = 0) -> Cluster:
    """The cluster with its inter-node links replaced (flags of `hvdllm plan`)."""
    if inter_gbit:
        bw = inter_gbit * 1e9 / 8
        cluster.allreduce_inter = Link(cluster.allreduce_inter.latency_s, bw)
        cluster.p2p_inter = Link(cluster.p2p_inter.latency_s, bw)
    if inter_latency_us:
        s = inter_latency_us * 1e-6
        cluster.allreduce_inter = Link(s, cluster.allreduce_inter.bytes_per_s)
        cluster.p2p_inter = Link(s, cluster.p2p_inter.bytes_per_s)
    if inter_gbit or inter_latency_us:
        cluster.notes.append(f"inter-node links set by flags: {cluster.p2p_inter.bytes_per_s * 8 / 1e9:g} "
                             f"Gbit/s, {cluster.p2p_inter.latency_s * 1e6:g} us")
    return cluster
