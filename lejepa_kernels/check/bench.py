"""A short speed and memory table: the seed eager, the seed under torch.compile, this package.

Each provider runs forward+backward of SIGReg on the same x: a warm-up call (two for the
compiled seed: compilation), then timed calls until about a second is spent (3 to 20; 20 on
CUDA). The first timed call also measures the peak extra memory: the CUDA allocator's peak, or
on the CPU the rise of the resident-set peak (Linux: reset through /proc/self/clear_refs, with
glibc told to map every block of 64 KiB or more on its own, so that freed tensors leave the
resident set).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..backends import choose
from ..modules import FusedSlicedEppsPulley
from ..reference import SlicedEppsPulley
from .accuracy import DTYPE_NAMES

PROVIDERS = ("seed", "seed compiled", "lejepa-kernels")
SECONDS_PER_PROVIDER = 1.0
MIN_ROUNDS, MAX_ROUNDS, CUDA_ROUNDS = 3, 20, 20


@dataclass(frozen=True)
class BenchSize:
    """A workload: rows, features, slices, grid points."""

    n: int
    d: int
    s: int
    t: int = 17


CPU_SIZES = (BenchSize(512, 128, 256), BenchSize(2048, 256, 1024))
CUDA_SIZES = (BenchSize(2048, 512, 1024), BenchSize(8192, 512, 8192))
"""The seed's defaults and the paper's largest workload."""
QUICK_SIZES = (BenchSize(256, 64, 128),)


def sizes_for(device: str, quick: bool) -> tuple[BenchSize, ...]:
    """The workloads measured on a device ("cpu" or "cuda")."""
    if quick:
        return QUICK_SIZES
    return CUDA_SIZES if device == "cuda" else CPU_SIZES


def bench_dtype(device: str) -> torch.dtype:
    """bf16 on CUDA (how models train there), fp32 on the CPU."""
    return torch.bfloat16 if device == "cuda" else torch.float32


@contextlib.contextmanager
def _quiet_compiler() -> Iterator[None]:
    """Silence torch.compile's warnings (the seed's graph break at `.item()` is expected)."""
    names = ("torch._dynamo", "torch._inductor", "torch.utils.cpp_extension")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} is not in /proc/self/status")


def cpu_memory_probe() -> Callable[[Callable[[], None]], float] | None:
    """A function measuring the peak extra resident memory (MiB) of a call, or None where the
    resident-set peak cannot be reset (not Linux). Sets glibc's mmap threshold to 64 KiB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
    except OSError:
        return None
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD: give freed memory back at once
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD: blocks of 64 KiB or more mapped on their own

    def measure(call: Callable[[], None]) -> float:
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        call()
        return (_status_kib("VmHWM") - before) / 1024

    return measure


def cuda_memory(call: Callable[[], None]) -> float:
    """Peak extra CUDA memory (MiB) allocated during call."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _module(provider: str, size: BenchSize, device: str) -> torch.nn.Module:
    if provider == "lejepa-kernels":
        return FusedSlicedEppsPulley(size.s, n_points=size.t).to(device)
    seed = SlicedEppsPulley(size.s, n_points=size.t).to(device)
    return torch.compile(seed) if provider == "seed compiled" else seed


def measure(provider: str, size: BenchSize, device: str, memory: Callable | None) -> dict[str, Any]:
    """One provider at one size: forward+backward milliseconds (median, min, max over the timed
    rounds), the first call's seconds, and peak extra memory in MiB (None where unmeasured)."""
    dtype = bench_dtype(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(size.n, size.d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    module = _module(provider, size, device)

    def step() -> None:
        x.grad = None
        module(x).backward()
        sync()

    with _quiet_compiler():
        started = time.perf_counter()
        step()
        first_call = time.perf_counter() - started
        if provider == "seed compiled":  # its second call still compiles
            step()
    peak = None
    times = []
    while len(times) < (CUDA_ROUNDS if device == "cuda" else MAX_ROUNDS):
        started = time.perf_counter()
        if memory is not None and peak is None:
            peak = memory(step)
        else:
            step()
        times.append(time.perf_counter() - started)
        if device != "cuda" and len(times) >= MIN_ROUNDS and sum(times) >= SECONDS_PER_PROVIDER:
            break
    return dict(
        ms=1e3 * statistics.median(times),
        ms_min=1e3 * min(times),
        ms_max=1e3 * max(times),
        rounds=len(times),
        first_call_seconds=first_call,
        peak_mib=peak,
    )


def run_bench(device: str, quick: bool, providers: tuple[str, ...] = PROVIDERS) -> Iterator[dict[str, Any]]:
    """Yield one row per (size, provider): the size, dtype, provider, its backend, and either
    `measure`'s figures or `error`. A row for this package also has `vs_seed` and `vs_compiled`
    (the seed's median over this package's) where those ran."""
    memory = cuda_memory if device == "cuda" else cpu_memory_probe()
    dtype = bench_dtype(device)
    for size in sizes_for(device, quick):
        medians: dict[str, float] = {}
        for provider in providers:
            row: dict[str, Any] = dict(
                n=size.n, d=size.d, s=size.s, t=size.t, device=device,
                dtype=DTYPE_NAMES[dtype], provider=provider,
            )
            if provider == "lejepa-kernels":
                row["backend"] = choose("auto", torch.empty(0, dtype=dtype, device=device), 17, 3.0 / 16)
            try:
                row.update(measure(provider, size, device, memory))
            except Exception as error:  # an out-of-memory seed, a compiler missing: a row, not a crash
                row["error"] = f"{type(error).__name__}: {error}"
                if device == "cuda":
                    torch.cuda.empty_cache()
            else:
                medians[provider] = row["ms"]
            if provider == "lejepa-kernels" and "ms" in row:
                for name, key in (("seed", "vs_seed"), ("seed compiled", "vs_compiled")):
                    if name in medians:
                        row[key] = medians[name] / row["ms"]
            yield row


def format_row(row: dict[str, Any]) -> str:
    """One row of the table: size, provider, milliseconds, memory and speed-ups."""
    provider = row["provider"] + (f" ({row['backend']})" if row.get("backend") else "")
    size = f"N={row['n']} D={row['d']} S={row['s']}"
    head = f"{row['dtype']} {size:<22} {provider:<24}"
    if "error" in row:
        return f"{head} failed: {row['error'].splitlines()[0][:200]}"
    text = f"{head} {row['ms']:9.2f} ms"
    text += f"  {row['peak_mib']:8.1f} MiB" if row["peak_mib"] is not None else "      n/a MiB"
    if row["provider"] == "seed compiled":
        text += f"  (first call {row['first_call_seconds']:.1f} s: compilation)"
    ratios = [f"{row[k]:.1f}x {name}" for k, name in (("vs_seed", "seed"), ("vs_compiled", "compiled")) if k in row]
    if ratios:
        text += "  " + ", ".join(ratios)
    return text


def header(device: str) -> str:
    """The table's title line: what is timed, in which dtype, where."""
    dtype = DTYPE_NAMES[bench_dtype(device)]
    where = f"{torch.get_num_threads()} threads" if device == "cpu" else torch.cuda.get_device_name(0)
    memory = "allocator peak" if device == "cuda" else "resident-set peak"
    return f"speed and memory: SIGReg forward+backward, {dtype} on {device} ({where}); median ms, extra {memory}"
