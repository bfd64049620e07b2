"""The native CPU backend: the ECF sums and their gradient with a small C kernel.

x is [G, N, D]: G groups of N rows, each with its own sums. The block loop is the PyTorch
backend's (`torch_backend.py`): torch forms each [groups x rows x slices] block of projections
`P = x_blk @ A_blk` in one matmul for every group; then `csrc/ecf_cpu.c` (built and loaded by `cpu_library`)
takes one vector sincos of u = dt P and runs the Chebyshev recurrence over the grid t_k = k dt in
vector registers, summing over each group's rows (forward) or forming dP in place of P
(backward) in one pass over all the groups, where the PyTorch backend needs two tensor ops per
grid point. The block's columns are split over `torch.get_num_threads()` threads (ctypes
releases the GIL).

It takes CPU tensors (fp32, bf16 and fp16, computed in fp32) on a uniform grid of at most
`cpu_library.MAX_POINTS` points; `unsupported` says why a call does not qualify.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from .cpu_library import MAX_POINTS, library, unavailable_reason
from .torch_backend import BLOCK_ELEMENTS, grad_proj_coefficients, project

NAME = "cpu"
VECTOR_WIDTH = 16
"""Columns per vector in the kernel: thread column ranges are multiples of it."""


def unavailable() -> str | None:
    """Why the kernel cannot run on this machine (it does not build or load), or None."""
    return unavailable_reason()


def unsupported(x: torch.Tensor, n_points: int, dt: float) -> str | None:
    """Why the kernel does not take this call, or None: it takes CPU tensors of fp32, bf16 or
    fp16 on a uniform grid (dt > 0) of at most MAX_POINTS points, any number of groups."""
    if x.device.type != "cpu":
        return f"it takes CPU tensors, got one on {x.device}"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"it takes fp32, bf16 or fp16, got {x.dtype}"
    if dt <= 0:
        return "it takes the uniform grid t_k = k * dt only, got an arbitrary grid"
    if n_points > MAX_POINTS:
        return f"it takes grids of at most {MAX_POINTS} points, got {n_points}"
    return None


def _check_call(x: torch.Tensor, n_points: int, dt: float) -> None:
    reason = unsupported(x, n_points, dt)
    if reason:
        raise ValueError(f"the native CPU kernel does not take this call: {reason}")


_pool_lock = threading.Lock()
_pool_state: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool)


def _run_on_pool(call: Callable[[int, int], int], ranges: list[tuple[int, int]]) -> list[int]:
    """call(begin, end) for each range on this process's worker threads: one pool, grown to the
    most ranges asked for (a forked child gets its own). Growing replaces the pool and shuts
    the old one down; submitting under the same lock means no caller still holds a pool it has
    yet to submit to when that happens (work already submitted runs to the end)."""
    global _pool_state
    with _pool_lock:
        if _pool_state is None or _pool_state[0] != os.getpid() or _pool_state[1] < len(ranges):
            if _pool_state is not None and _pool_state[0] == os.getpid():
                _pool_state[2].shutdown(wait=False)
            pool = ThreadPoolExecutor(len(ranges), thread_name_prefix="lejepa_kernels")
            _pool_state = (os.getpid(), len(ranges), pool)
        futures = [_pool_state[2].submit(call, *r) for r in ranges]
    return [future.result() for future in futures]


def _over_columns(call: Callable[[int, int], int], width: int) -> None:
    """call(begin, end) on contiguous ranges covering [0, width), one per thread; each must
    return 0 (the kernel's success)."""
    per_thread = -(-width // max(1, torch.get_num_threads()))
    per_thread = -(-per_thread // VECTOR_WIDTH) * VECTOR_WIDTH
    ranges = [(begin, min(width, begin + per_thread)) for begin in range(0, width, per_thread)]
    codes = [call(*ranges[0])] if len(ranges) == 1 else _run_on_pool(call, ranges)
    if any(codes):
        raise RuntimeError(f"the native CPU kernel failed (codes {codes})")


def _blocks(
    n_groups: int, n_rows: int, n_slices: int, block_elements: int
) -> Iterator[tuple[slice, slice]]:
    """(row range, slice range) pairs covering [n_rows, n_slices], each taken in every group: a
    block has a vector of columns per thread (or all of them), then as many columns and rows as
    block_elements allows for n_groups x rows x columns."""
    min_cols = VECTOR_WIDTH * max(1, torch.get_num_threads())
    cols_per_block = min(n_slices, max(min_cols, block_elements // (n_groups * n_rows)))
    rows_per_block = min(n_rows, max(1, block_elements // (n_groups * cols_per_block)))
    for s0 in range(0, n_slices, cols_per_block):
        for r0 in range(0, n_rows, rows_per_block):
            yield slice(r0, r0 + rows_per_block), slice(s0, s0 + cols_per_block)


def ecf_sums(
    x: torch.Tensor,
    A: torch.Tensor,
    t: torch.Tensor,
    dt: float,
    block_elements: int = BLOCK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos_sums, sin_sums), [G, S, T] fp32 each: sums over each group's rows of cos and sin of
    t_k (x @ A).

    x: [G, N, D] fp32/bf16/fp16 on the CPU; A: [D, S]; t: [T], the grid t_k = k * dt
    (only its length is read). Partial sums over 256 rows are added in fp64.
    """
    lib = library()
    n_points, n_slices = t.numel(), A.shape[1]
    _check_call(x, n_points, dt)
    x, A = x.float(), A.float()
    n_groups = x.shape[0]
    sums = torch.zeros(2, n_groups, n_points, n_slices, dtype=torch.float64)
    for rows, cols in _blocks(n_groups, x.shape[1], n_slices, block_elements):
        P = project(x, A, rows, cols)
        n_rows, width = P.shape[1:]
        cos_out, sin_out = sums[0, :, :, cols], sums[1, :, :, cols]
        _over_columns(
            lambda begin, end: lib.ecf_forward_block(
                P.data_ptr(), n_groups, n_rows, width, dt, begin, end, n_points,
                cos_out.data_ptr(), sin_out.data_ptr(), n_slices, n_points * n_slices,
            ),
            width,
        )
    return sums[0].transpose(1, 2).float().contiguous(), sums[1].transpose(1, 2).float().contiguous()


def ecf_sums_backward(
    x: torch.Tensor,
    A: torch.Tensor,
    t: torch.Tensor,
    grad_cos: torch.Tensor,
    grad_sin: torch.Tensor,
    dt: float,
    block_elements: int = BLOCK_ELEMENTS,
) -> torch.Tensor:
    """dx [G, N, D] in x's dtype from the gradients [G, S, T] of the sums, recomputing
    projections.

    x: [G, N, D]; t: [T], the grid (t_k = k * dt). dx[g] = dP[g] @ A^T with
    dP[g, n, s] = sum_k t_k (cos(t_k P) grad_sin - sin(t_k P) grad_cos)[g, n, s, k].
    """
    lib = library()
    _check_call(x, t.numel(), dt)
    xc, A, t = x.float(), A.float(), t.float()
    n_points, n_slices = t.numel(), A.shape[1]
    cos_coef, sin_coef = grad_proj_coefficients(t, grad_cos, grad_sin)
    n_groups = xc.shape[0]
    grad_x = torch.zeros_like(xc)
    for rows, cols in _blocks(n_groups, xc.shape[1], n_slices, block_elements):
        P = project(xc, A, rows, cols)
        n_rows, width = P.shape[1:]
        cos_in, sin_in = cos_coef[:, :, cols], sin_coef[:, :, cols]
        _over_columns(
            lambda begin, end: lib.ecf_backward_block(
                P.data_ptr(), n_groups, n_rows, width, dt, begin, end, n_points,
                cos_in.data_ptr(), sin_in.data_ptr(), n_slices, n_points * n_slices,
            ),
            width,
        )
        grad_x[:, rows].baddbmm_(P, A[:, cols].T.expand(n_groups, -1, -1))  # P now holds dP
    return grad_x.to(x.dtype)
