"""The kernels' configurations chosen on the user's GPU: each candidate timed once, the fastest kept.

The first launch of a kernel with a new key (kernel, dtype, grid kind and length, and N, D, S
rounded up to powers of 2, N and S at most SAMPLE_ROWS and SAMPLE_SLICES) on a CUDA device times
every candidate of `config.FORWARD_CANDIDATES` or `config.BACKWARD_CANDIDATES` on that launch's
own inputs, their first SAMPLE_ROWS rows and SAMPLE_SLICES slices (`triton.testing.do_bench`),
and keeps the fastest. The choice holds for the rest of the process and is written to a JSON
file in the private cache (`private_cache`), one per GPU model and Triton version, so that later
processes on this machine choose the same and give the same bits. Different configurations sum in different
orders: their results agree to rounding, not bit for bit.

The first candidate is used, without tuning, for calls of fewer than MIN_TUNED_PROJECTIONS
projections, with LEJEPA_KERNELS_TUNING=0, on CPU tensors (Triton's interpreter), and while a
CUDA graph is being captured.
"""

from __future__ import annotations

import functools
import json
import os
import re
import warnings
from collections.abc import Callable

import torch
import triton

from .. import private_cache
from .config import BACKWARD_CANDIDATES, FORWARD_CANDIDATES, LONG_GRID_FORWARD_CANDIDATES, KernelConfig

TUNING_ENV = "LEJEPA_KERNELS_TUNING"
MIN_TUNED_PROJECTIONS = 1 << 22
"""Calls with fewer projections N * S than this take the first candidate: their launch costs
more than any configuration saves, and tuning them would cost more still."""
CANDIDATES = {
    "forward": FORWARD_CANDIDATES,
    "forward_long_grid": LONG_GRID_FORWARD_CANDIDATES,
    "backward": BACKWARD_CANDIDATES,
}
SAMPLE_ROWS, SAMPLE_SLICES = 8192, 16384
"""Candidates are timed on at most this many rows and slices of a call (the paper's workload
fits): enough to fill a GPU, and a huge call is not run dozens of times."""
WARMUP_MS, REPEAT_MS = 10, 40
"""triton.testing.do_bench's warm-up and measuring budgets per candidate (milliseconds)."""
_FIELDS = ("block_n", "block_s", "block_d", "num_warps", "num_stages")
_choices: dict[str, dict[str, KernelConfig]] = {}
"""Per tuning file: its choices, loaded at first use and kept for the process."""


def tuned_config(
    kernel: str,
    x: torch.Tensor,
    n_slices: int,
    n_points: int,
    uniform: bool,
    launch: Callable[[KernelConfig], object],
) -> KernelConfig:
    """The configuration of `kernel` (a key of CANDIDATES) for x [G, N, D] with n_slices and
    n_points: the choice made on this GPU, or made now by timing `launch(config)` for each
    candidate (a launch must have no effect other than its result)."""
    candidates = CANDIDATES[kernel][x.dtype]
    if len(candidates) == 1 or x.shape[0] * x.shape[1] * n_slices < MIN_TUNED_PROJECTIONS or not _tuning_on(x):
        return candidates[0]
    name = _file_name(x.device)
    choices = _load(name)
    key = _key(kernel, x, n_slices, n_points, uniform)
    if key not in choices:
        choices[key] = _fastest(candidates, launch)
        _save(name, key, choices[key])
    return choices[key]


def tuning_sample(n_groups: int, n_rows: int, n_slices: int) -> tuple[int, int]:
    """(groups, rows per group, slices) of a call of n_groups groups of n_rows rows that its
    candidates are timed on: at most SAMPLE_ROWS rows in all and SAMPLE_SLICES slices."""
    rows = min(n_rows, SAMPLE_ROWS)
    return max(1, min(n_groups, SAMPLE_ROWS // rows)), rows, min(n_slices, SAMPLE_SLICES)


def _tuning_on(x: torch.Tensor) -> bool:
    if os.environ.get(TUNING_ENV, "1") == "0" or x.device.type != "cuda":
        return False
    return not torch.cuda.is_current_stream_capturing()


def _key(kernel: str, x: torch.Tensor, n_slices: int, n_points: int, uniform: bool) -> str:
    groups, rows, S = tuning_sample(*x.shape[:2], n_slices)
    sizes = "-".join(
        f"{name}{triton.next_power_of_2(size)}" for name, size in zip("NDS", (groups * rows, x.shape[2], S))
    )
    return f"{kernel}:{str(x.dtype).removeprefix('torch.')}:{'uniform' if uniform else 'direct'}{n_points}:{sizes}"


@functools.lru_cache(maxsize=None)
def _file_name(device: torch.device) -> str:
    """The tuning file of this GPU model and Triton version (computed once per device)."""
    properties = torch.cuda.get_device_properties(device)
    model = re.sub(r"[^A-Za-z0-9]+", "-", properties.name).strip("-").lower()
    return f"tuning-{model}-sm{properties.major}{properties.minor}-triton{triton.__version__}.json"


def _fastest(candidates: tuple[KernelConfig, ...], launch: Callable[[KernelConfig], object]) -> KernelConfig:
    """The candidate whose launch takes the least time (median of do_bench); one that fails to
    run here (e.g. more shared memory than this GPU has) is passed over."""
    timings, failures = {}, []
    for candidate in candidates:
        try:
            timings[candidate] = triton.testing.do_bench(
                lambda: launch(candidate), warmup=WARMUP_MS, rep=REPEAT_MS, return_mode="median"
            )
        except triton.runtime.errors.OutOfResources as error:
            failures.append(error)
    if not timings:
        raise failures[0]
    return min(timings, key=timings.get)


def _load(name: str) -> dict[str, KernelConfig]:
    """The choices of the tuning file `name` (read from the cache once per process); entries
    that are not candidates of this version's kernels are ignored."""
    if name not in _choices:
        _choices[name] = {}
        for key, fields in _read(name).items():
            try:
                kernel_name, dtype_name = key.split(":")[:2]
                choice = KernelConfig(*fields)
                candidates = CANDIDATES[kernel_name][getattr(torch, dtype_name)]
            except (TypeError, ValueError, KeyError, AttributeError):
                continue
            if choice in candidates:
                _choices[name][key] = choice
    return _choices[name]


def _read(name: str) -> dict[str, list]:
    try:
        directory_fd, _ = private_cache.open_cache()
    except (private_cache.CacheUnavailable, OSError):
        return {}
    try:
        fd = private_cache.open_own_file(directory_fd, name)
        if fd is None:
            return {}
        with open(fd, "rb") as file:
            data = json.loads(file.read())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
    finally:
        os.close(directory_fd)


def _save(name: str, key: str, choice: KernelConfig) -> None:
    """Add key -> choice to the tuning file (merged with what other processes wrote); when the
    cache cannot be written, warn once and keep the choice for this process only."""
    try:
        directory_fd, _ = private_cache.open_cache()
        try:
            data = {**_read(name), key: [getattr(choice, field) for field in _FIELDS]}
            private_cache.replace_file(directory_fd, name, json.dumps(data, indent=1, sort_keys=True).encode())
        finally:
            os.close(directory_fd)
    except (private_cache.CacheUnavailable, OSError) as error:
        warnings.warn(
            f"lejepa_kernels: kernel tuning choices are not saved ({error}); they hold for this process only",
            stacklevel=3,
        )
