"""Backward kernel: dP = d(loss)/d(x @ A) for a chunk of slices, recomputing x @ A.

A program owns a [BLOCK_S, BLOCK_N] (slices x rows) tile: it recomputes the projection tile with
`tl.dot`, runs the same trig recurrence as the forward and accumulates, in registers,
    dP[n, s] = sum_k cos(t_k P) cos_coef[k, s] + sin(t_k P) sin_coef[k, s]
with cos_coef = t * dL/dZ and sin_coef = -t * dL/dC. The tile is written out transposed, as
dP^T [chunk, N] (fp32, or bf16 for bf16 inputs), and cuBLAS adds dP @ A^T to an fp32 dx, chunk
of slices by chunk of slices, so the dP buffer stays within `dp_budget` (at most DP_CHUNK_BYTES,
and a share of the GPU's free memory) and no [N, S, T] tensor exists.

Why chunk + cuBLAS rather than one kernel that also does dP @ A^T: a program that owns rows
must hold a [BLOCK_N, D] fp32 accumulator (D in the hundreds to thousands does not fit in
registers), and splitting D across programs repeats the projection and all the trig once per
D split; the trig is the costly part, so the recomputation would dominate.
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
)
from .tuning import tuned_config, tuning_sample

DP_CHUNK_BYTES = 1 << 30
"""Largest dP buffer the backward allocates (bytes); slices are processed in chunks below it."""
DP_SHARE_OF_FREE_MEMORY = 8
"""On a GPU the dP buffer also stays within 1/DP_SHARE_OF_FREE_MEMORY of the memory free there."""
MAX_GRID_Y = 65535


@triton.jit
def _ecf_backward_kernel(
    x_ptr,
    a_ptr,
    t_ptr,
    coef_ptr,
    dp_ptr,
    N,
    D,
    S,
    chunk_start,
    stride_xg,
    stride_xn,
    stride_dp,
    row_tiles,
    dt,
    T: tl.constexpr,
    CHUNK_T: tl.constexpr,
    UNIFORM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
):
    """One [BLOCK_S, BLOCK_N] tile of dP^T for a chunk of slices, from the recomputed P.

    Grid: (G * row_tiles, cdiv(chunk, BLOCK_S)), row_tiles = cdiv(N, BLOCK_N); program (i, j)
    owns rows [r * BLOCK_N, (r + 1) * BLOCK_N) of group g = i // row_tiles (r = i % row_tiles)
    and slices chunk_start + [j * BLOCK_S, (j + 1) * BLOCK_S).

    Args:
        x_ptr: x [G, N, D], fp32/bf16/fp16, groups stride_xg and rows stride_xn elements apart,
            features contiguous.
        a_ptr: A [D, S], contiguous, in x's dtype (fp32 holding bf16 values when UPCAST_BF16).
        t_ptr: t [T], fp32, contiguous; read only when not UNIFORM.
        coef_ptr: coefficients [G, 2, T, S], fp32, contiguous: [g, 0] = (t * dL/dsin_sums[g])^T
            multiplies cos(t_k P), [g, 1] = (-t * dL/dcos_sums[g])^T multiplies sin(t_k P).
        dp_ptr: dP^T [chunk, G * N] of this chunk's slices (column g * N + n: row n of group g),
            fp32 (bf16 for bf16 x), contiguous; the slices past S are not written.
        N, D, S: rows per group and features of x, slices of A (int32 range).
        chunk_start: the chunk's first slice.
        stride_xg, stride_xn: elements between groups and between rows of x.
        stride_dp: elements between rows of dP^T, G * N.
        row_tiles: row tiles per group, cdiv(N, BLOCK_N).
        dt: grid spacing, t_k = k * dt (fp32); used when UNIFORM.
        T (constexpr): grid points.
        CHUNK_T (constexpr): grid points per chunk (`config.grid_chunk`).
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

    # -- 0. this program's rows and slices (cols in A, local_cols in the chunk) ----
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    group = pid_n // row_tiles
    rows = (pid_n % row_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    local_cols = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = chunk_start + local_cols
    row_mask = rows < N
    col_mask = cols < S
    # -- 1. projection tile: P^T = A^T x^T, recomputed (the forward never stores P) ----
    p = _projection_tile(
        row_starts(x_ptr, group, stride_xg), a_ptr, rows, cols, row_mask, col_mask, D, S, stride_xn,
        BLOCK_N, BLOCK_S, BLOCK_D, INPUT_PRECISION, UPCAST_BF16,
    )
    # -- 2. dP^T = sum_k cos(t_k P) cos_coef[k] + sin(t_k P) sin_coef[k], in registers ----
    # The coefficients are a [2T, S] matrix: rows k (of cos(t_k P)) and T + k (of sin(t_k P)).
    coef_ptr = row_starts(coef_ptr, group, 2 * T * S)
    grad = tl.zeros((BLOCK_S, BLOCK_N), dtype=tl.float32)
    if UNIFORM:
        # rotation recurrence, restarted from direct trig at each chunk of CHUNK_T points (one
        # chunk when CHUNK_T == T), as the forward does
        alpha, beta = _rotation_start(p, dt)
        for k0 in range(0, T, CHUNK_T):
            cos_k, sin_k = _chunk_start(p, k0, dt, 1.0, CHUNK_T == T)
            for k in range(k0, tl.minimum(k0 + CHUNK_T, T)):
                a = tl.load(row_starts(coef_ptr, k, S) + cols, mask=col_mask, other=0.0)
                b = tl.load(row_starts(coef_ptr, T + k, S) + cols, mask=col_mask, other=0.0)
                grad += cos_k * a[:, None] + sin_k * b[:, None]
                cos_k, sin_k = _rotation_step(alpha, beta, cos_k, sin_k)
    else:
        # direct trig at each point
        for k in range(T):
            sin_k, cos_k = sincos(tl.load(t_ptr + k) * p)
            a = tl.load(row_starts(coef_ptr, k, S) + cols, mask=col_mask, other=0.0)
            b = tl.load(row_starts(coef_ptr, T + k, S) + cols, mask=col_mask, other=0.0)
            grad += cos_k * a[:, None] + sin_k * b[:, None]
    # epilogue: the tile of dP^T [chunk, G * N], in dP's dtype (cuBLAS then adds dP @ A^T to dx)
    out = row_starts(dp_ptr, local_cols, stride_dp)[:, None] + (group * N + rows)[None, :]
    tl.store(out, grad.to(dp_ptr.dtype.element_ty), mask=col_mask[:, None] & row_mask[None, :])


def dp_budget(device: torch.device) -> int:
    """Bytes the dP buffer may take on `device`: DP_CHUNK_BYTES, and on a GPU at most a
    1/DP_SHARE_OF_FREE_MEMORY share of the memory the driver reports free (one cudaMemGetInfo:
    torch's own memory statistics cost far more host time)."""
    if device.type != "cuda":
        return DP_CHUNK_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    return min(DP_CHUNK_BYTES, free // DP_SHARE_OF_FREE_MEMORY)


def slices_per_chunk(n_rows: int, n_slices: int, itemsize: int, block_s: int, budget: int) -> int:
    """Slices per dP chunk: a multiple of block_s whose dP [chunk, n_rows] of itemsize bytes
    fits in budget bytes (at least one tile), at most n_slices, and few enough tiles for the
    grid's second axis (< 65536)."""
    tiles = max(1, budget // (n_rows * itemsize * block_s))
    return min(n_slices, min(tiles, MAX_GRID_Y) * block_s)


def add_product(grad_x: torch.Tensor, dp: torch.Tensor, directions: torch.Tensor) -> None:
    """grad_x += dp @ directions, summed in fp32: grad_x [N, D] fp32, dp [N, chunk] fp32 or
    bf16, directions [chunk, D] as the kernels read A (`kernel_directions`: bf16 for bf16 dp
    on a GPU, fp32 otherwise).

    For bf16 on a GPU, cuBLAS multiplies the bf16 operands on tensor cores and returns fp32
    (`out_dtype`), so no chunk's product is rounded to bf16; on the CPU (the interpreter) the
    same bf16 values are multiplied in fp32.
    """
    if dp.dtype == torch.float32 or dp.device.type == "cpu":
        grad_x.addmm_(dp.float(), directions.float())
    else:
        grad_x.add_(torch.mm(dp, directions.to(dp.dtype), out_dtype=torch.float32))


def ecf_backward(
    x: torch.Tensor,
    A: torch.Tensor,
    t: torch.Tensor,
    grad_cos: torch.Tensor,
    grad_sin: torch.Tensor,
    dt: float,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """dx in x's dtype from the gradients grad_cos, grad_sin of the ECF sums: x [N, D] with
    gradients [S, T], or x [G, N, D] with gradients [G, S, T] (all groups in one launch per
    chunk of slices).

    x: fp32/bf16/fp16, any strides; A: [D, S]; t: [T] (any layouts and float dtypes: see
    `kernel_operands`); dt as in `ecf_forward`; config defaults to the tuned choice for this
    device and shape (`tuning.tuned_config`).
    """
    shape = x.shape
    x, A, t = kernel_operands(x, A, t)
    S, T = A.shape[1], t.numel()
    grad_cos, grad_sin = grad_cos.float().reshape(-1, S, T), grad_sin.float().reshape(-1, S, T)
    # [G, 2, T, S]: coefficients of cos(t_k P) and sin(t_k P) in dP, contiguous along slices.
    coef = torch.stack([t * grad_sin, -t * grad_cos], dim=1).transpose(2, 3).contiguous()
    directions = kernel_directions(A, x)
    budget = dp_budget(x.device)
    if config is None:
        groups, rows, slices = tuning_sample(*x.shape[:2], S)
        sample = (
            x[:groups, :rows], directions[:, :slices].contiguous(), t,
            coef[:groups, :, :, :slices].contiguous(),
        )
        config = tuned_config(
            "backward", x, S, T, dt > 0, lambda candidate: _launch(*sample, dt, candidate, budget)
        )
    return _launch(x, directions, t, coef, dt, config, budget).to(x.dtype).view(shape)


def _launch(
    x: torch.Tensor,
    directions: torch.Tensor,
    t: torch.Tensor,
    coef: torch.Tensor,
    dt: float,
    config: KernelConfig,
    budget: int,
) -> torch.Tensor:
    """dx [G * N, D] fp32 for x [G, N, D]: the kernel over chunks of slices, each followed by
    dx += dP @ A^T."""
    G, N, D = x.shape
    S, T = directions.shape[1], t.numel()
    dp_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    chunk = slices_per_chunk(G * N, S, dp_dtype.itemsize, config.block_s, budget)
    dp_t = torch.empty(chunk, G * N, dtype=dp_dtype, device=x.device)
    grad_x = torch.zeros(G * N, D, dtype=torch.float32, device=x.device)
    row_tiles = triton.cdiv(N, config.block_n)
    for start in range(0, S, chunk):
        size = min(chunk, S - start)
        grid = (G * row_tiles, triton.cdiv(size, config.block_s))
        with launch_scope(x.device):
            _ecf_backward_kernel[grid](
                x, directions, t, coef, dp_t,  # pointers: x, A, t, coefficients, dP^T
                N, D, S, start,  # sizes, and the chunk's first slice
                x.stride(0), x.stride(1), G * N,  # strides: stride_xg, stride_xn, stride_dp
                row_tiles, float(dt),  # scalars: row tiles per group, grid spacing
                T=T, CHUNK_T=grid_chunk(T), UNIFORM=dt > 0,  # constexprs: the grid
                BLOCK_N=config.block_n, BLOCK_S=config.block_s, BLOCK_D=config.block_d,  # constexprs: tile
                INPUT_PRECISION=input_precision(x.dtype), UPCAST_BF16=interpreter_bf16(x),  # constexprs: dot
                num_warps=config.num_warps, num_stages=config.num_stages,  # launch options
            )
        add_product(grad_x, dp_t[:size].T, directions[:, start : start + size].T)
    return grad_x
