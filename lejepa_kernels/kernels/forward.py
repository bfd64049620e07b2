"""Forward kernel: cos/sin sums of t_k (x @ A) over rows, fused with the projection matmul.

A program owns BLOCK_S slices, one contiguous range of one group's rows (a "split") and one chunk
of grid points. It walks its rows BLOCK_N at a time: the [BLOCK_S, BLOCK_N] projection tile is formed by
`tl.dot` in fp32 and, while it is in registers, turned into the chunk's cos and sin row sums,
which are added to [BLOCK_S, BLOCK_T] accumulators that stay in registers for the whole walk.
Each program writes its accumulators once, to its own slot of a [splits, 2, T, S] fp32 buffer;
torch sums that over splits in a fixed order, so the result is deterministic (no atomics).

On the uniform grid t_k = k dt the chunk's values come from cos and sin of dt P by the rotation
recurrence (`_rotation_step`), started at the chunk's first point; any other grid uses direct
trig.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import _chunk_start, _projection_tile, _rotation_start, _rotation_step, row_starts, sincos
from .config import (
    KernelConfig,
    grid_chunk,
    input_precision,
    interpreter_bf16,
    kernel_directions,
    kernel_operands,
    launch_scope,
    program_count_target,
)
from .tuning import tuned_config, tuning_sample


@triton.jit
def _ecf_forward_kernel(
    x_ptr,
    a_ptr,
    t_ptr,
    partial_ptr,
    N,
    D,
    S,
    stride_xg,
    stride_xn,
    splits,
    rows_per_split,
    dt,
    T: tl.constexpr,
    CHUNK_T: tl.constexpr,
    UNIFORM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
):
    """Partial cos_sums and sin_sums of BLOCK_S slices over one split's rows, at one chunk of
    CHUNK_T grid points.

    Grid: (cdiv(S, BLOCK_S), G * splits, cdiv(T, CHUNK_T)); program (i, j, c) owns slices
    [i * BLOCK_S, (i + 1) * BLOCK_S), rows [s * rows_per_split, (s + 1) * rows_per_split) of
    group g = j // splits (s = j % splits) and grid points [c * CHUNK_T, (c + 1) * CHUNK_T).

    Args:
        x_ptr: x [G, N, D], fp32/bf16/fp16, groups stride_xg and rows stride_xn elements apart,
            features contiguous.
        a_ptr: A [D, S], contiguous, in x's dtype (fp32 holding bf16 values when UPCAST_BF16).
        t_ptr: t [T], fp32, contiguous; read only when not UNIFORM.
        partial_ptr: partial sums [G * splits, 2, T, S], fp32, contiguous: program (i, j, c)
            writes [j, 0] (cos_sums^T) and [j, 1] (sin_sums^T) at its slices and grid points, once.
        N, D, S: rows per group and features of x, slices of A (int32 range).
        stride_xg, stride_xn: elements between groups and between rows of x.
        splits: splits per group.
        rows_per_split: rows per split, a multiple of BLOCK_N (a group's last may have fewer).
        dt: grid spacing, t_k = k * dt (fp32); used when UNIFORM.
        T (constexpr): grid points.
        CHUNK_T (constexpr): grid points per chunk (`config.grid_chunk`).
        UNIFORM (constexpr): the grid is t_k = k * dt (rotation recurrence); else direct trig of t.
        BLOCK_N, BLOCK_S, BLOCK_D (constexpr): rows and slices of a tile, features per tl.dot step.
        BLOCK_T (constexpr): CHUNK_T rounded up to a power of 2 (the accumulators' width).
        INPUT_PRECISION (constexpr): tl.dot precision ("tf32x3" for fp32 x, else "ieee").
        UPCAST_BF16 (constexpr): multiply bf16 tiles in fp32 (the interpreter; see _projection_tile).
    """
    # tl.arange takes power-of-2 lengths; tl.dot takes K >= 16 for 16-bit operands.
    tl.static_assert((BLOCK_N & (BLOCK_N - 1)) == 0, "BLOCK_N must be a power of 2")
    tl.static_assert((BLOCK_S & (BLOCK_S - 1)) == 0, "BLOCK_S must be a power of 2")
    tl.static_assert((BLOCK_D & (BLOCK_D - 1)) == 0, "BLOCK_D must be a power of 2")
    tl.static_assert(BLOCK_D >= 16, "BLOCK_D must be >= 16 (tl.dot's K)")
    tl.static_assert(BLOCK_T >= CHUNK_T, "BLOCK_T must hold a chunk")

    # -- 0. this program's slices, rows and grid points ----
    pid_s = tl.program_id(0)
    split = tl.program_id(1)
    group_x_ptr = row_starts(x_ptr, split // splits, stride_xg)
    k0 = tl.program_id(2) * CHUNK_T
    cols = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    col_mask = cols < S
    points = tl.arange(0, BLOCK_T)
    row_start = (split % splits) * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, N)
    # The sums of this program's slices at its grid points, over its rows: column k holds
    # grid point k0 + k. Kept in registers across the whole row walk.
    cos_acc = tl.zeros((BLOCK_S, BLOCK_T), dtype=tl.float32)
    sin_acc = tl.zeros((BLOCK_S, BLOCK_T), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_N):
        # -- 1. projection tile: P^T = A^T x^T, fp32, kept in registers ----
        rows = r0 + tl.arange(0, BLOCK_N)
        row_mask = rows < row_end
        p = _projection_tile(
            group_x_ptr, a_ptr, rows, cols, row_mask, col_mask, D, S, stride_xn,
            BLOCK_N, BLOCK_S, BLOCK_D, INPUT_PRECISION, UPCAST_BF16,
        )
        # 1 on real rows, 0 on padding: it scales the chunk's first values, so padded rows add 0.
        valid = tl.where(row_mask, 1.0, 0.0)[None, :]
        # -- 2. cos/sin at each grid point of the chunk; their row sums into column k ----
        # (The row sums stay within a warp when warps split only the slices axis.)
        if UNIFORM:
            # rotation recurrence, unrolled: k is a compile-time constant, so the select of
            # column k folds to the few registers that hold it
            alpha, beta = _rotation_start(p, dt)
            cos_k, sin_k = _chunk_start(p, k0, dt, valid, CHUNK_T == T)
            for k in tl.static_range(CHUNK_T):
                column = points[None, :] == k
                cos_acc = tl.where(column, cos_acc + tl.sum(cos_k, axis=1)[:, None], cos_acc)
                sin_acc = tl.where(column, sin_acc + tl.sum(sin_k, axis=1)[:, None], sin_acc)
                if k + 1 < CHUNK_T:
                    cos_k, sin_k = _rotation_step(alpha, beta, cos_k, sin_k)
        else:
            # direct trig at each point, in a loop (unrolled, the trig of many points would be
            # in flight at once and spill registers)
            for k in range(CHUNK_T):
                t_k = tl.load(t_ptr + k0 + k, mask=k0 + k < T, other=0.0)
                sin_k, cos_k = sincos(t_k * p)
                column = points[None, :] == k
                cos_acc = tl.where(column, cos_acc + tl.sum(cos_k * valid, axis=1)[:, None], cos_acc)
                sin_acc = tl.where(column, sin_acc + tl.sum(sin_k * valid, axis=1)[:, None], sin_acc)
    # -- 3. one write of this program's sums: rows split * 2T + k (cos), + T (sin) ----
    out = row_starts(partial_ptr, split * (2 * T) + k0 + points, S)[None, :] + cols[:, None]
    mask = col_mask[:, None] & ((points < CHUNK_T) & (k0 + points < T))[None, :]
    tl.store(out, cos_acc, mask=mask)
    tl.store(out + T * S, sin_acc, mask=mask)


def ecf_forward(
    x: torch.Tensor,
    A: torch.Tensor,
    t: torch.Tensor,
    dt: float,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos_sums, sin_sums) fp32: sums over rows of cos and sin of t_k (x @ A), [S, T] for x
    [N, D], [G, S, T] for x [G, N, D] (each group's own sums, all groups in one launch).

    x: fp32/bf16/fp16, any strides; A: [D, S]; t: [T] (any layouts and float dtypes: see
    `kernel_operands`). dt > 0 declares t_k = k * dt (recurrence); 0 means use t directly.
    config defaults to the tuned choice for this device and shape (`tuning.tuned_config`).
    """
    grouped = x.dim() == 3
    x, A, t = kernel_operands(x, A, t)
    directions = kernel_directions(A, x)
    if config is None:
        groups, rows, slices = tuning_sample(*x.shape[:2], directions.shape[1])
        sample = (x[:groups, :rows], directions[:, :slices].contiguous(), t)
        kernel = "forward" if grid_chunk(t.numel()) == t.numel() else "forward_long_grid"
        config = tuned_config(
            kernel, x, directions.shape[1], t.numel(), dt > 0, lambda candidate: _launch(*sample, dt, candidate)
        )
    partials = _launch(x, directions, t, dt, config)
    partials = partials.view(x.shape[0], -1, *partials.shape[1:])  # [G, splits, 2, T, S]
    cos_sums, sin_sums = (partials[:, :, i].sum(1).transpose(1, 2).contiguous() for i in (0, 1))
    return (cos_sums, sin_sums) if grouped else (cos_sums[0], sin_sums[0])


def _launch(
    x: torch.Tensor, directions: torch.Tensor, t: torch.Tensor, dt: float, config: KernelConfig
) -> torch.Tensor:
    """The kernel's partial sums [G * splits, 2, T, S] fp32 (group-major), from x [G, N, D] and
    the operands as `kernel_operands` and `kernel_directions` give them."""
    G, N, D = x.shape
    S, T = directions.shape[1], t.numel()
    chunk_t = grid_chunk(T)
    chunks = triton.cdiv(T, chunk_t)
    slice_tiles = triton.cdiv(S, config.block_s)
    row_blocks = triton.cdiv(N, config.block_n)
    programs_per_split = slice_tiles * chunks * G
    splits = min(row_blocks, max(1, triton.cdiv(program_count_target(x.device), programs_per_split)))
    rows_per_split = triton.cdiv(row_blocks, splits) * config.block_n
    splits = triton.cdiv(N, rows_per_split)
    partials = torch.empty(G * splits, 2, T, S, dtype=torch.float32, device=x.device)
    with launch_scope(x.device):
        _ecf_forward_kernel[(slice_tiles, G * splits, chunks)](
            x, directions, t, partials,  # pointers: x, A, t, partial sums
            N, D, S,  # sizes
            x.stride(0), x.stride(1),  # strides: stride_xg, stride_xn
            splits, rows_per_split, float(dt),  # scalars: splits per group, rows per split, grid spacing
            T=T, CHUNK_T=chunk_t, UNIFORM=dt > 0,  # constexprs: the grid
            BLOCK_N=config.block_n, BLOCK_S=config.block_s, BLOCK_D=config.block_d,  # constexprs: tile
            BLOCK_T=triton.next_power_of_2(chunk_t),  # constexprs: the accumulators' width
            INPUT_PRECISION=input_precision(x.dtype), UPCAST_BF16=interpreter_bf16(x),  # constexprs: dot
            num_warps=config.num_warps, num_stages=config.num_stages,  # launch options
        )
    return partials
