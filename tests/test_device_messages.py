"""Pipeline message buffers (hvdllm/parallel/device_messages.py): which path a device takes, the
CUDA-aware detection, and the host path's buffers. The device and pinned paths need a GPU
(scripts/gpu-check.sh); here they are only chosen, not run."""

from __future__ import annotations

import numpy as np
import torch

from hvdllm.parallel.device_messages import (
    MessageBuffers, detect_cuda_aware, message_path, parse_ompi_info)

OMPI_CUDA = "mca:mpi:base:param:mpi_built_with_cuda_support:value:true\n"
OMPI_NO_CUDA = "mca:mpi:base:param:mpi_built_with_cuda_support:value:false\n"


def test_paths_follow_the_device_and_the_mpi():
    assert message_path(torch.device("cpu"), cuda_aware=True) == "host"
    assert message_path(torch.device("cuda", 0), cuda_aware=True) == "device"
    assert message_path(torch.device("cuda", 0), cuda_aware=False) == "pinned"


def test_cuda_awareness_is_asked_of_the_library_or_forced():
    ompi = "Open MPI v4.1.4, package: Debian OpenMPI"
    assert parse_ompi_info("x:y\n" + OMPI_CUDA) and not parse_ompi_info(OMPI_NO_CUDA)
    assert detect_cuda_aware({}, ompi, OMPI_CUDA)
    assert not detect_cuda_aware({}, ompi, OMPI_NO_CUDA)
    assert not detect_cuda_aware({}, ompi, None)  # no ompi_info: not trusted
    assert detect_cuda_aware({"MV2_USE_CUDA": "1"}, "MVAPICH2 Version 2.3.7", None)
    assert not detect_cuda_aware({}, "MPICH Version: 4.1", None)
    assert detect_cuda_aware({"HVDLLM_CUDA_AWARE_MPI": "1"}, "MPICH Version: 4.1", None)
    assert not detect_cuda_aware({"HVDLLM_CUDA_AWARE_MPI": "0"}, ompi, OMPI_CUDA)


def test_host_buffers_are_the_tensors_own_bytes():
    buffers = MessageBuffers(torch.device("cpu"))
    assert buffers.path == "host"
    t = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    payload, keep = buffers.outgoing(t)
    assert isinstance(payload, np.ndarray) and payload.nbytes == t.numel() * 2
    into, out = buffers.incoming([2, 3], torch.bfloat16)
    into[:] = payload  # what MPI would do
    assert torch.equal(buffers.arrived(out), t) and keep.data_ptr() == t.data_ptr()
    empty, _ = buffers.outgoing(torch.zeros(0, 4))
    assert empty.nbytes == 0
