"""Where and in what precision to compute: CUDA when present, else CPU; bf16 autocast only where it is fast.

bf16 on a CPU without AVX512-BF16 or AMX is emulated and slow (measured: 0.5 GFLOP/s against 52 GFLOP/s fp32
on an AVX2-only EPYC), so 'auto' checks the CPU's flags instead of assuming.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(device: torch.device, precision: str) -> bool:
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
