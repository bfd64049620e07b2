"""Forward kernel: cos/sin sums of t_k (x @ A) over rows, fused with the projection matmul.

A program owns BLOCK_S slices and one contiguous range of rows (a "split"). It walks its rows
BLOCK_N at a time: the [BLOCK_S, BLOCK_N] projection tile is formed by `tl.dot` in fp32 and,
while it is in registers, turned into the T cos and sin column sums, which are added to the
program's own slot of a small [splits, 2, T, S] fp32 buffer. Only that buffer leaves the kernel;
torch sums it over splits in a fixed order, so the result is deterministic.

On the uniform grid t_k = k dt the T values come from cos and sin of dt P by the rotation
recurrence (`_rotation_step`); any other grid uses direct trig.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import _projection_tile, _rotation_start, _rotation_step, row_starts, sincos
from .config import (
    FORWARD_CONFIGS,
    KernelConfig,
    input_precision,
    interpreter_bf16,
    kernel_directions,
    kernel_operands,
    launch_scope,
    program_count_target,
)


@triton.jit
def _accumulate(ptr, col_mask, values):
    """ptr[cols] += values: the slot belongs to this program alone, so no atomics (a barrier
    between row blocks orders the read after the previous block's write)."""
    tl.store(ptr, tl.load(ptr, mask=col_mask, other=0.0) + values, mask=col_mask)


@triton.jit
def _ecf_forward_kernel(
    x_ptr,
    a_ptr,
    t_ptr,
    partial_ptr,
    N,
    D,
    S,
    stride_xn,
    rows_per_split,
    dt,
    T: tl.constexpr,
    UNIFORM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
):
    """Partial cos_sums and sin_sums of BLOCK_S slices over one split's rows.

    Grid: (cdiv(S, BLOCK_S), splits); program (i, j) owns slices [i * BLOCK_S, (i + 1) * BLOCK_S)
    and rows [j * rows_per_split, (j + 1) * rows_per_split) of x.

    Args:
        x_ptr: x [N, D], fp32/bf16/fp16, rows stride_xn elements apart, features contiguous.
        a_ptr: A [D, S], fp32, contiguous (holding bf16-rounded values when UPCAST_BF16).
        t_ptr: t [T], fp32, contiguous; read only when not UNIFORM.
        partial_ptr: partial sums [splits, 2, T, S], fp32, contiguous, zero on entry: program
            (i, j) adds to [j, 0] (cos_sums^T) and [j, 1] (sin_sums^T) of its slices only.
        N, D, S: rows and features of x, slices of A (int32 range).
        stride_xn: elements between rows of x.
        rows_per_split: rows per split, a multiple of BLOCK_N (the last split may have fewer).
        dt: grid spacing, t_k = k * dt (fp32); used when UNIFORM.
        T (constexpr): grid points.
        UNIFORM (constexpr): the grid is t_k = k * dt (rotation recurrence); else direct trig of t.
        BLOCK_N, BLOCK_S, BLOCK_D (constexpr): rows and slices of a tile, features per tl.dot step.
        INPUT_PRECISION (constexpr): tl.dot precision ("tf32x3" for fp32 x, else "ieee").
        UPCAST_BF16 (constexpr): multiply bf16 tiles in fp32 (the interpreter; see _projection_tile).
    """
    # tl.arange takes power-of-2 lengths; tl.dot takes K >= 16 for 16-bit operands.
    tl.static_assert((BLOCK_N & (BLOCK_N - 1)) == 0, "BLOCK_N must be a power of 2")
    tl.static_assert((BLOCK_S & (BLOCK_S - 1)) == 0, "BLOCK_S must be a power of 2")
    tl.static_assert((BLOCK_D & (BLOCK_D - 1)) == 0, "BLOCK_D must be a power of 2")
    tl.static_assert(BLOCK_D >= 16, "BLOCK_D must be >= 16 (tl.dot's K)")

    # -- 0. this program's slices, and the rows of its split ----
    pid_s = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    col_mask = cols < S
    # This program's slot: rows split * 2T + k (cos) and split * 2T + T + k (sin) of the
    # partial sums seen as a [splits * 2T, S] matrix.
    cos_row = split * (2 * T)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, N)
    for r0 in range(row_start, row_end, BLOCK_N):
        # -- 1. projection tile: P^T = A^T x^T, fp32, kept in registers ----
        rows = r0 + tl.arange(0, BLOCK_N)
        row_mask = rows < row_end
        p = _projection_tile(
            x_ptr, a_ptr, rows, cols, row_mask, col_mask, D, S, stride_xn,
            BLOCK_N, BLOCK_S, BLOCK_D, INPUT_PRECISION, UPCAST_BF16,
        )
        # 1 on real rows, 0 on padding: it scales the recurrence's seeds, so padded rows add 0.
        valid = tl.where(row_mask, 1.0, 0.0)[None, :]
        # -- 2. pointers to grid point 0 of this program's slot (cos, then sin) ----
        cos_out = row_starts(partial_ptr, cos_row, S) + cols
        sin_out = row_starts(cos_out, T, S)
        # -- 3. cos/sin for every grid point; add their row sums into this program's slot ----
        if UNIFORM:
            # rotation recurrence: one sincos per element, then a rotation per grid point
            alpha, beta = _rotation_start(p, dt)
            cos_k = tl.zeros_like(p) + valid
            sin_k = tl.zeros_like(p)
            for k in range(T):
                _accumulate(cos_out, col_mask, tl.sum(cos_k, axis=1))
                _accumulate(sin_out, col_mask, tl.sum(sin_k, axis=1))
                cos_k, sin_k = _rotation_step(alpha, beta, cos_k, sin_k, k, p, dt, valid, T)
                cos_out += S
                sin_out += S
        else:
            # any other grid: direct trig of t_k P at each point
            for k in range(T):
                sin_k, cos_k = sincos(tl.load(t_ptr + k) * p)
                _accumulate(cos_out, col_mask, tl.sum(cos_k * valid, axis=1))
                _accumulate(sin_out, col_mask, tl.sum(sin_k * valid, axis=1))
                cos_out += S
                sin_out += S
        # -- 4. barrier: the next row block re-reads these sums, perhaps from other threads ----
        tl.debug_barrier()


def ecf_forward(
    x: torch.Tensor,
    A: torch.Tensor,
    t: torch.Tensor,
    dt: float,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos_sums, sin_sums) [S, T] fp32: sums over rows of cos and sin of t_k (x @ A).

    x: [N, D] fp32/bf16/fp16, any strides; A: [D, S]; t: [T] (any layouts and float dtypes:
    see `kernel_operands`). dt > 0 declares t_k = k * dt (recurrence); 0
    means use t directly. config defaults to FORWARD_CONFIGS[x.dtype].
    """
    x, A, t = kernel_operands(x, A, t)
    config = config or FORWARD_CONFIGS[x.dtype]
    N, D = x.shape
    S, T = A.shape[1], t.numel()
    slice_tiles = triton.cdiv(S, config.block_s)
    row_blocks = triton.cdiv(N, config.block_n)
    splits = min(row_blocks, max(1, triton.cdiv(program_count_target(x.device), slice_tiles)))
    rows_per_split = triton.cdiv(row_blocks, splits) * config.block_n
    splits = triton.cdiv(N, rows_per_split)
    partials = torch.zeros(splits, 2, T, S, dtype=torch.float32, device=x.device)
    with launch_scope(x.device):
        _ecf_forward_kernel[(slice_tiles, splits)](
            x, kernel_directions(A, x), t, partials,  # pointers: x, A, t, partial sums
            N, D, S,  # sizes
            x.stride(0),  # strides: stride_xn
            rows_per_split, float(dt),  # scalars: rows per split, grid spacing
            T=T, UNIFORM=dt > 0,  # constexprs: the grid
            BLOCK_N=config.block_n, BLOCK_S=config.block_s, BLOCK_D=config.block_d,  # constexprs: tile
            INPUT_PRECISION=input_precision(x.dtype), UPCAST_BF16=interpreter_bf16(x),  # constexprs: dot
            num_warps=config.num_warps, num_stages=config.num_stages,  # launch options
        )
    return partials[:, 0].sum(0).T.contiguous(), partials[:, 1].sum(0).T.contiguous()
