"""Speed and memory of SIGReg: the seed eager, the seed under torch.compile, and this package.

One benchmark per (provider, workload, mode). extra_info holds the workload, the device, the
peak extra memory (MiB) and its ratio to the seed's, and on a GPU the achieved TFLOP/s of the
three matmuls and the fraction of a roofline model. A provider that runs out of memory is
recorded with status "OOM" and a single empty round.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, device_name, peak_rates
from workloads import Workload, make_input, make_module, step_functions

DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CPU_SECONDS_PER_BENCHMARK = 3.0
_seed_memory: dict[tuple[str, str], float] = {}


def rounds_for(call_seconds: float) -> int:
    """Timed rounds: 20 on a GPU; on the CPU as many as fill CPU_SECONDS_PER_BENCHMARK, 3 to 15
    (the noisier fast calls get more rounds, a 4-second seed call gets 3)."""
    if DEVICE.type == "cuda":
        return 20
    return max(3, min(15, math.ceil(CPU_SECONDS_PER_BENCHMARK / max(call_seconds, 1e-6))))


def matmul_flops(workload: Workload, mode: str) -> float:
    """x @ A in the forward; its recomputation and dP @ A^T in the backward."""
    per_matmul = 2.0 * workload.n * workload.d * workload.s
    return per_matmul * {"forward": 1, "backward": 2, "forward+backward": 3}[mode]


def elementwise_flops(workload: Workload, mode: str) -> float:
    """Model: per projection, ~40 flops for one cos and one sin, then per grid point 6 in the
    forward (2 recurrence FMAs and 2 sums) and 8 in the backward (2 FMAs more)."""
    per_projection = {"forward": 40 + 6 * workload.t, "backward": 40 + 8 * workload.t}
    per_projection["forward+backward"] = per_projection["forward"] + per_projection["backward"]
    return workload.n * workload.s * per_projection[mode]


def gpu_peak_extra_mib(setup, target) -> float:
    if setup:
        setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    target()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


# glibc then maps every allocation of 64 KiB or more on its own and unmaps it when freed, so the
# resident-set peak follows the live tensors instead of memory the heap kept from earlier calls.
EXACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def cpu_peak_extra_mib(provider: str, workload: Workload, mode: str, warmups: int = 2) -> float:
    """Measured in a fresh process: resident-set peaks are not reset by freeing memory."""
    script = Path(__file__).parent / "workloads.py"
    args = [provider, workload.n, workload.d, workload.s, mode, str(DTYPE).split(".")[-1], warmups]
    result = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        capture_output=True, text=True, check=True, env={**os.environ, **EXACT_MALLOC},
    )
    return float(result.stdout.strip().splitlines()[-1])


def test_sigreg(benchmark, provider: str, workload: Workload, mode: str):
    if DEVICE.type == "cpu" and mode != "forward+backward" and provider == "seed_compiled":
        pytest.skip("CPU: the compiled seed is timed on the training step only (compile cost)")
    benchmark.group = f"{workload.name}-{mode}"
    benchmark.extra_info.update(
        provider=provider, workload=workload.name, n=workload.n, d=workload.d, s=workload.s,
        t=workload.t, mode=mode, dtype=str(DTYPE), device=device_name(),
    )
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    try:
        module = make_module(provider, workload, DEVICE)
        x = make_input(workload, DTYPE, DEVICE)
        setup, target = step_functions(module, x, mode, sync)
        for _ in range(2):  # compilation, autotuning and allocator warm-up stay untimed
            if setup:
                setup()
            started = time.perf_counter()
            target()
            call_seconds = time.perf_counter() - started
        if DEVICE.type == "cuda":
            peak = gpu_peak_extra_mib(setup, target)
        elif mode == "forward+backward":
            peak = cpu_peak_extra_mib(provider, workload, mode)
        else:
            peak = None
        benchmark.pedantic(target, setup=setup, rounds=rounds_for(call_seconds), iterations=1)
    except torch.OutOfMemoryError:
        benchmark.extra_info["status"] = "OOM"
        torch.cuda.empty_cache()
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        return
    benchmark.extra_info["status"] = "ok"
    if peak is not None:
        benchmark.extra_info["peak_extra_mib"] = round(peak, 1)
        key = (workload.name, mode)
        if provider == "seed":
            _seed_memory[key] = peak
        if key in _seed_memory and _seed_memory[key] > 0:
            benchmark.extra_info["memory_vs_seed"] = round(peak / _seed_memory[key], 4)
    rates = peak_rates()
    if rates is not None:
        seconds = benchmark.stats.stats.median
        mma, fp32 = (rate * 1e12 for rate in rates)
        flops = matmul_flops(workload, mode)
        model_seconds = flops / mma + elementwise_flops(workload, mode) / fp32
        benchmark.extra_info["tflops"] = round(flops / seconds / 1e12, 1)
        benchmark.extra_info["roofline_fraction"] = round(model_seconds / seconds, 3)
