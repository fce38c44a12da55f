"""Where a pipeline message's bytes sit while MPI moves them (parallel/pipeline.py's PointToPoint).

    host    a CPU tensor: MPI reads and writes the tensor's own memory
    device  a CUDA tensor and a CUDA-aware MPI: MPI reads and writes GPU memory directly (mpi4py
            takes the tensor through its __cuda_array_interface__), no copy through the host
    pinned  a CUDA tensor and an MPI that only knows host memory: the bytes are staged through
            page-locked host buffers (torch's caching host allocator reuses them) with
            non-blocking copies, so a copy runs at the link's full rate and never pages

MPI knows nothing of CUDA streams: before MPI touches GPU memory (device) or a staged buffer
(pinned) the current stream is synchronised, so the bytes it reads are the ones computed.

Whether MPI is CUDA-aware: HVDLLM_CUDA_AWARE_MPI=1/0 decides when set; otherwise Open MPI is asked
(`ompi_info --parsable`: mpi_built_with_cuda_support) and MVAPICH2 is trusted when MV2_USE_CUDA=1;
anything else counts as not CUDA-aware (pinned staging works everywhere).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import numpy as np
import torch


def parse_ompi_info(text: str) -> bool:
    """Whether `ompi_info --parsable --all` output says Open MPI was built with CUDA support."""
    return any(line.strip() == "mca:mpi:base:param:mpi_built_with_cuda_support:value:true"
               for line in text.splitlines())


def detect_cuda_aware(environ: dict[str, str], library_version: str,
                      ompi_info: str | None) -> bool:
    """The decision of `cuda_aware_mpi`, from its inputs (so it can be tested without MPI)."""
    forced = environ.get("HVDLLM_CUDA_AWARE_MPI", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if "Open MPI" in library_version:
        return ompi_info is not None and parse_ompi_info(ompi_info)
    if "MVAPICH" in library_version:
        return environ.get("MV2_USE_CUDA") == "1"
    return False


@functools.lru_cache(maxsize=1)
def cuda_aware_mpi() -> bool:
    """Whether the MPI library this process runs can move GPU memory itself (asked once)."""
    from mpi4py import MPI

    version = MPI.Get_library_version()
    info = None
    if "Open MPI" in version and shutil.which("ompi_info"):
        info = subprocess.run(["ompi_info", "--parsable", "--all"], capture_output=True,
                              text=True, timeout=60).stdout
    return detect_cuda_aware(dict(os.environ), version, info)


def message_path(device: torch.device, cuda_aware: bool) -> str:
    """host, device or pinned (the module docstring) for tensors on `device`."""
    if device.type != "cuda":
        return "host"
    return "device" if cuda_aware else "pinned"


class MessageBuffers:
    """The buffers of one stage's messages, for the path its device takes."""

    def __init__(self, device: torch.device, cuda_aware: bool | None = None) -> None:
        if cuda_aware is None:
            cuda_aware = device.type == "cuda" and cuda_aware_mpi()
        self.device, self.path = device, message_path(device, cuda_aware)

    def outgoing(self, tensor: torch.Tensor) -> tuple[object, torch.Tensor]:
        """(what MPI sends, the tensor to keep alive until the send completes)."""
        t = tensor.detach().contiguous()
        if self.path == "host" or t.device.type != "cuda":
            t = t.cpu()
            return (t.view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)), t
        if self.path == "pinned":
            staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            staged.copy_(t, non_blocking=True)
            torch.cuda.current_stream(t.device).synchronize()  # the copy is done before MPI reads
            return staged.view(torch.uint8).numpy(), staged
        torch.cuda.current_stream(t.device).synchronize()  # the tensor is computed
        return t.view(torch.uint8).view(-1), t

    def incoming(self, shape: list[int], dtype: torch.dtype) -> tuple[object, torch.Tensor]:
        """(what MPI receives into, the tensor that holds it)."""
        if self.path == "device":
            out = torch.empty(shape, dtype=dtype, device=self.device)
            torch.cuda.current_stream(self.device).synchronize()
            return out.view(torch.uint8).view(-1), out
        out = torch.empty(shape, dtype=dtype, pin_memory=self.path == "pinned")
        return (out.view(torch.uint8).numpy() if out.numel() else np.zeros(0, np.uint8)), out

    def arrived(self, tensor: torch.Tensor) -> torch.Tensor:
        """The received tensor on this stage's device (pinned: a non-blocking copy)."""
        return tensor.to(self.device, non_blocking=self.path == "pinned")
