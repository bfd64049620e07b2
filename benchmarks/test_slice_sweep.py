"""The slice-count sweep: one training step (forward+backward) of this package's module at
N = 1024 rows (4096 on a GPU), D = 512 and S = 2^K slices, with the seed's directions ("fused") and blockwise ones
("fused_blockwise"). Opt-in: `pytest benchmarks --slice-sweep 12,14,16,18,20` (see conftest.py);
then `python benchmarks/report.py` turns the JSON into a table and the time/memory plot.

Time should grow linearly in S for both; the peak extra memory of "fused" grows with S (A [D, S]
and the [S, T] sums), that of "fused_blockwise" stays flat.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from conftest import DEVICE, device_name
from test_sigreg import DTYPE, cpu_peak_extra_mib, gpu_peak_extra_mib
from workloads import Workload, make_input, make_module, step_functions

N, D = (4096 if DEVICE.type == "cuda" else 1024), 512
SECONDS_PER_POINT = 10.0
"""Timed rounds fill about this long (1 to 5 rounds): a call at S = 2^20 takes tens of seconds."""


@pytest.mark.parametrize("directions", ["seed", "blockwise"])
def test_slice_sweep(benchmark, directions: str, slices: int):
    provider = "fused_blockwise" if directions == "blockwise" else "fused"
    workload = Workload(f"sweep-s{slices}", N, D, slices)
    mode = "forward+backward"
    benchmark.group = "slice-sweep"
    benchmark.extra_info.update(
        provider=provider, workload=workload.name, n=N, d=D, s=slices, t=workload.t, mode=mode,
        dtype=str(DTYPE), device=device_name(),
    )
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    module = make_module(provider, workload, DEVICE)
    x = make_input(workload, DTYPE, DEVICE)
    setup, target = step_functions(module, x, mode, sync)
    started = time.perf_counter()
    target()  # warm-up: the native kernel's build, the allocator
    call_seconds = time.perf_counter() - started
    if DEVICE.type == "cuda":
        peak = gpu_peak_extra_mib(setup, target)
    else:
        peak = cpu_peak_extra_mib(provider, workload, mode, warmups=1)
    rounds = max(1, min(5, math.ceil(SECONDS_PER_POINT / call_seconds)))
    benchmark.pedantic(target, rounds=rounds, iterations=1)
    benchmark.extra_info.update(status="ok", peak_extra_mib=round(peak, 1))
