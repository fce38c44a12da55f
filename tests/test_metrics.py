"""MFU's peak: the datasheet table for known GPUs, a measured matmul elsewhere."""

from __future__ import annotations

import pytest
import torch

from hvdllm.metrics import datasheet_tflops, mfu_peak


@pytest.mark.parametrize("name, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", (989.0, "H100")),
    ("NVIDIA H100 PCIe", "bf16", (756.0, "H100 PCIe")),
    ("NVIDIA H200", "fp32", (67.0, "H200")),
    ("NVIDIA A100-SXM4-80GB", "fp16", (312.0, "A100")),
    ("NVIDIA L40S", "bf16", (362.0, "L40S")),
    ("AMD Instinct MI300X", "bf16", (1307.0, "MI300X")),
    ("NVIDIA GeForce RTX 4090", "bf16", None),
])
def test_datasheet_peak_by_device_name(name, dtype, expected):
    assert datasheet_tflops(name, dtype) == expected


def test_cpu_peak_is_measured_and_says_so():
    peak, source = mfu_peak("fp32", torch.device("cpu"))
    assert peak > 0 and source == "measured fp32 matmul"
