"""What the benchmarks run: workloads, providers, modes, and the peak-memory probe.

Run as a script (`python benchmarks/workloads.py PROVIDER N D S MODE DTYPE [WARMUPS]`) it
measures the peak extra resident memory of one CPU call in a fresh process and prints it in MiB.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch

from lejepa_kernels import FusedSlicedEppsPulley
from lejepa_kernels.reference import SlicedEppsPulley


@dataclass(frozen=True)
class Workload:
    name: str
    n: int
    d: int
    s: int
    t: int = 17


GPU_WORKLOADS = [
    Workload("default", 2048, 512, 1024),
    Workload("paper", 8192, 512, 8192),
    Workload("wide", 4096, 512, 65536),
]
CPU_WORKLOADS = [
    Workload("cpu-s256", 2048, 512, 256),
    Workload("cpu-s1024", 2048, 512, 1024),
    Workload("cpu", 2048, 512, 4096),
]
PROVIDERS = ("seed", "seed_compiled", "fused")
MODES = ("forward", "backward", "forward+backward")


def make_module(provider: str, workload: Workload, device: torch.device) -> torch.nn.Module:
    """The SIGReg module of a provider: the seed eager, the seed compiled, or this package (with
    the seed's directions, or "fused_blockwise": directions drawn block by block)."""
    if provider in ("fused", "fused_blockwise"):
        directions = "blockwise" if provider == "fused_blockwise" else "seed"
        return FusedSlicedEppsPulley(workload.s, n_points=workload.t, directions=directions).to(device)
    module = SlicedEppsPulley(workload.s, n_points=workload.t).to(device)
    return torch.compile(module) if provider == "seed_compiled" else module


def make_input(workload: Workload, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(workload.n, workload.d, generator=g).to(device=device, dtype=dtype)
    return x.requires_grad_()


def step_functions(
    module: torch.nn.Module, x: torch.Tensor, mode: str, sync: Callable[[], None]
) -> tuple[Callable[[], object] | None, Callable[[], None]]:
    """(setup, target) for pytest-benchmark's pedantic: target is the timed part of `mode`.

    For "backward" the setup runs the forward; the others need no setup. Both end with `sync`
    so that a device's queued work is inside the timed region.
    """

    def forward():
        x.grad = None
        loss = module(x)
        sync()
        return loss

    if mode == "forward":
        return None, forward
    if mode == "forward+backward":

        def step():
            x.grad = None
            module(x).backward()
            sync()

        return None, step
    held = {}

    def setup():
        held["loss"] = forward()
        return (), {}

    def backward():
        held.pop("loss").backward()
        sync()

    return setup, backward


def cpu_peak_extra_mib(
    provider: str, workload: Workload, mode: str, dtype: torch.dtype, warmups: int = 2
) -> float:
    """Peak extra resident memory (MiB) of one call, after `warmups` calls, in this (fresh) process.

    Linux only: the peak (VmHWM) is reset through /proc/self/clear_refs before the call.
    """
    torch.set_num_threads(2)
    device = torch.device("cpu")
    module = make_module(provider, workload, device)
    x = make_input(workload, dtype, device)
    setup, target = step_functions(module, x, mode, lambda: None)
    for _ in range(warmups):
        if setup:
            setup()
        target()
    if setup:
        setup()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    target()
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


if __name__ == "__main__":
    provider, n, d, s, mode, dtype, *warmups = sys.argv[1:]
    workload = Workload("probe", int(n), int(d), int(s))
    print(cpu_peak_extra_mib(provider, workload, mode, getattr(torch, dtype), *map(int, warmups)))
