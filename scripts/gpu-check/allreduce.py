"""One-rank NCCL checks for scripts/gpu-check.sh (run under `horovodrun --gloo -np 1`).

Writes JSON to argv[1]: per dtype whether a CUDA all-reduce returned the exact sum/scaled value
on the device, and the time of a 256 MiB fp32 all-reduce (NCCL with one rank: a local copy; the
number shows the path works, not a link's speed). bf16 goes through patch 0003's ncclBfloat16
and its CUDA scaling kernel (prescale 0.5).
"""
import json
import sys
import time

import horovod.torch as hvd
import torch


def main() -> None:
    hvd.init()
    torch.cuda.set_device(hvd.local_rank())
    out = {"nccl_built": int(hvd.nccl_built()), "cuda_built": bool(hvd.cuda_built()),
           "device": torch.cuda.get_device_name(), "size": hvd.size()}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.arange(1, 1025, device="cuda", dtype=torch.float32).to(dtype)
        summed = hvd.allreduce(x, op=hvd.Sum, name=f"sum.{dtype}")
        scaled = hvd.allreduce(x, op=hvd.Sum, prescale_factor=0.5, name=f"scaled.{dtype}")
        out[str(dtype).replace("torch.", "")] = {
            "on_device": summed.is_cuda and summed.dtype == dtype,
            "sum_exact": torch.equal(summed, x * hvd.size()),
            "prescale_exact": torch.equal(scaled, (x.float() * 0.5 * hvd.size()).to(dtype))}
    big = torch.ones(64 * 2**20, device="cuda")
    hvd.allreduce(big, name="warm")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(5):
        hvd.allreduce(big, name=f"big.{i}")
    torch.cuda.synchronize()
    out["allreduce_256MiB_ms"] = (time.perf_counter() - start) / 5 * 1000
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
