"""What the user sees: the console line, metrics.jsonl, TensorBoard scalars, and MFU."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from hvdllm.log import logger
from hvdllm.precision import DTYPES


def measure_peak_tflops(dtype: str, device: torch.device, size: int = 1024,
                        budget_s: float = 0.2) -> float:
    """Dense matmul rate of this rank for the dtype (TFLOP/s): the denominator of MFU.

    Repeats a size x size matmul for about budget_s; dtypes without a fast path on this device
    (fp16 on most CPUs) are measured on a smaller matrix so start-up stays quick.
    """
    def timed(n: int, reps: int) -> float:
        a = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
        b = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
        a @ b  # warm-up
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        return (time.perf_counter() - start) / reps

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    n = size if timed(256, 1) < budget_s / 50 else 256
    once = timed(n, 1)
    seconds = timed(n, max(1, min(50, int(budget_s / max(once, 1e-6)))))
    return 2 * n ** 3 / seconds / 1e12


DATASHEET_TFLOPS = {  # dense (no sparsity) matmul peaks per GPU, from the vendors' datasheets
    "H100 PCIe": {"bf16": 756, "fp16": 756, "fp32": 51},
    "H100": {"bf16": 989, "fp16": 989, "fp32": 67},
    "H200": {"bf16": 989, "fp16": 989, "fp32": 67},
    "A100": {"bf16": 312, "fp16": 312, "fp32": 19.5},
    "L40S": {"bf16": 362, "fp16": 362, "fp32": 91.6},
    "MI300X": {"bf16": 1307, "fp16": 1307, "fp32": 163.4},
}
"""MFU's denominator on common data-centre GPUs, matched against torch's device name in this
order (the PCIe H100 before the SXM one). fp32 is the plain FP32 rate: hvdllm leaves TF32 off."""


def datasheet_tflops(device_name: str, dtype: str) -> tuple[float, str] | None:
    """(dense TFLOP/s, the entry's name) for a GPU the table knows, else None."""
    for key, rates in DATASHEET_TFLOPS.items():
        if key in device_name:
            return float(rates[dtype]), key
    return None


def mfu_peak(dtype: str, device: torch.device) -> tuple[float, str]:
    """MFU's peak per rank and where it came from: a GPU's datasheet, else a measured matmul
    (on GPUs 8192^3 after a warm-up: a small product reads far below a GPU's peak and would
    inflate MFU; on CPUs measure_peak_tflops' 1024^2)."""
    if device.type != "cuda":
        return measure_peak_tflops(dtype, device), f"measured {dtype} matmul"
    name = torch.cuda.get_device_name(device)
    known = datasheet_tflops(name, dtype)
    if known:
        return known[0], f"datasheet {known[1]} dense {dtype}"
    return measure_peak_tflops(dtype, device, size=8192, budget_s=1.0), \
        f"measured 8192^3 {dtype} matmul on {name}"


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


COMM_KEYS = ("sync_ms", "allreduce_bytes")


def tensorboard_tag(key: str) -> str:
    """The scalar's TensorBoard tag: val/…, memory/…, comm/… or train/…."""
    if key.startswith("val_"):
        return f"val/{key[4:]}"
    if key.startswith("memory_"):
        return f"memory/{key[7:]}"
    if key in COMM_KEYS:
        return f"comm/{key}"
    return f"train/{key}"


class MetricsWriter:
    """metrics.jsonl + TensorBoard under run_dir/tb; only the writing rank creates one."""

    def __init__(self, run_dir: Path, job_toml: str, total_steps: int, start_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.total_steps = total_steps
        path = run_dir / "metrics.jsonl"
        if path.is_file():  # resuming: drop rows of steps that will be trained again
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.jsonl = path.open("a", buffering=1)
        # TensorBoard drops events of steps older than a restart's first step (purge_step).
        self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self.tb.add_text("job", "```toml\n" + job_toml + "\n```", 0)
        self._val: tuple[int, float, float] | None = None
        """(step, val_loss, val_ppl) of the latest evaluation logged, for the console."""

    def log(self, step: int, values: dict[str, float]) -> None:
        """Write the step's values to metrics.jsonl and TensorBoard.

        An evaluation is also shown on the console: by `console` right after the step's training
        line, or here, on its own line, when the step has no training loss (no console call).
        """
        record = {"step": step, **{k: v for k, v in values.items() if v is not None}}
        self.jsonl.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step":
                self.tb.add_scalar(tensorboard_tag(key), value, step)
        if "val_loss" in record:
            self._val = (step, record["val_loss"], record["val_ppl"])
            if "loss" not in record:
                logger.info(self._val_line())

    def image(self, tag: str, image, step: int) -> None:
        """An H x W x 3 uint8 image in TensorBoard's images (the pipeline chart)."""
        self.tb.add_image(tag, image, step, dataformats="HWC")

    def _val_line(self) -> str:
        """`step N/T | val loss X | ppl Y` for the latest evaluation logged."""
        step, loss, ppl = self._val
        return f"step {step:>6}/{self.total_steps} | val loss {loss:.4f} | ppl {ppl:.2f}"

    def console(self, step: int, m: dict[str, float], elapsed_s: float, done_steps: int) -> None:
        """The training line of a step with a training loss (after `log` of the same step),
        followed by its validation line when the step evaluated."""
        remaining = (self.total_steps - step) * elapsed_s / max(done_steps, 1)
        line = (f"step {step:>6}/{self.total_steps} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
                f"{m['tokens_per_s']:,.0f} tok/s | MFU {100 * m['mfu']:.1f}% | "
                f"{m['step_ms']:.0f} ms/step | ETA {format_eta(remaining)}")
        if m.get("loss_scale", 1.0) != 1.0:
            line += f" | scale {m['loss_scale']:.0f}"
        if "bubble" in m:
            line += f" | bubble {100 * m['bubble']:.0f}% (theory {100 * m['bubble_theory']:.0f}%)"
        logger.info(line)
        if self._val is not None and self._val[0] == step:  # evaluated at this step: show it
            logger.info(self._val_line())

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()
