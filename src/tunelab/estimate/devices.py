"""The devices an estimate can be for: datasheet GPUs, or this machine's CPU measured."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from tunelab.config import UserError

GIB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    tflops: float  # dense bf16 tensor-core peak from the datasheet (CPU: measured fp32 matmul)
    memory_gib: float
    mfu: float = 0.4  # share of the peak a training step reaches (model FLOPs utilisation)
    cuda: bool = True
    rate_source: str = "datasheet bf16 peak"  # where `tflops` comes from, for the printout


# Datasheet dense (no sparsity) bf16 TFLOP/s. A 40 % MFU is typical of a well-fed single-GPU loop.
DEVICES = {
    "h100": Device("H100 SXM 80GB", 989, 80),
    "h100-pcie": Device("H100 PCIe 80GB", 756, 80),
    "h200": Device("H200 141GB", 989, 141),
    "a100": Device("A100 80GB", 312, 80),
    "a100-80gb": Device("A100 80GB", 312, 80),
    "a100-40gb": Device("A100 40GB", 312, 40),
    "l40s": Device("L40S 48GB", 362, 48),
    "a10": Device("A10 24GB", 125, 24),
    "l4": Device("L4 24GB", 121, 24),
    "rtx4090": Device("RTX 4090 24GB", 165, 24),
    "rtx3090": Device("RTX 3090 24GB", 71, 24),
}
GENERIC_GPU = Device("a CUDA GPU (no --device: no time estimate)", 0, 0)
# Resident memory of a training process before any tensor: the interpreter with torch, transformers and peft
# imported (410 MiB measured on the 2-core CI CPU, torch 2.13, transformers 5.x, peft 0.21, 2026-11-30).
CPU_BASELINE = 0.40 * GIB
CPU_MFU = 0.7  # tunelab's loop reached 0.65 (LoRA) to 0.77 (full FT) of the fp32 matmul rate on a 2-core CPU


PROBE_SECONDS = 0.25  # the CPU probe's budget: a few to a few dozen matmuls on current CPUs


def measure_cpu_tflops(seconds: float = PROBE_SECONDS) -> float:
    """fp32 matmul rate of this machine at torch's current thread count (the one training uses), TFLOP/s: the best
    of the 1024 x 1024 matmuls that fit in `seconds` after a warm-up (best, not mean: other processes only slow it)."""
    import time

    import torch

    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool, caches
    best, start = math.inf, time.perf_counter()
    while best == math.inf or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def cpu_device(tflops: float | None = None) -> Device:
    """This machine's CPU, its fp32 matmul rate measured by the probe, or `tflops` if given (a known rate;
    deterministic output in tests)."""
    import torch

    ram = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)
    if tflops is None:
        tflops, source = measure_cpu_tflops(), f"measured by a fp32 matmul probe on {torch.get_num_threads()} threads"
    else:
        source = "given, not measured"
    return Device(f"CPU ({os.cpu_count()} cores)", tflops, ram, CPU_MFU, cuda=False, rate_source=source)


def get_device(name: str | None) -> Device:
    if name is None:
        return GENERIC_GPU
    key = name.lower()
    if key == "cpu":
        return cpu_device()
    if key not in DEVICES:
        raise UserError(f"--device {name}: unknown; choose cpu or one of {', '.join(DEVICES)}")
    return DEVICES[key]
