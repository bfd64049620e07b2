"""Forward kernel: cos/sin sums of t_k (x @ A) over rows, fused with the projection matmul.

A program owns BLOCK_S slices and one contiguous range of rows (a "split"). It walks its rows
BLOCK_N at a time: the [BLOCK_S, BLOCK_N] projection tile is formed by `tl.dot` in fp32 and,
while it is in registers, turned into the T cos and sin column sums, which are added to the
program's own slot of a small [splits, 2, T, S] fp32 buffer. Only that buffer leaves the kernel;
torch sums it over splits in a fixed order, so the result is deterministic.

On the uniform grid t_k = k dt the T values come from cos and sin of dt P by the rotation
recurrence (`rotation_step`); any other grid uses direct trig.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import projection_tile, rotation_start, rotation_step, row_starts, sincos
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
def ecf_forward_kernel(
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
        rows = r0 + tl.arange(0, BLOCK_N)
        row_mask = rows < row_end
        p = projection_tile(
            x_ptr, a_ptr, rows, cols, row_mask, col_mask, D, S, stride_xn,
            BLOCK_N, BLOCK_S, BLOCK_D, INPUT_PRECISION, UPCAST_BF16,
        )
        # 1 on real rows, 0 on padding: it scales the recurrence's seeds, so padded rows add 0.
        valid = tl.where(row_mask, 1.0, 0.0)[None, :]
        cos_out = row_starts(partial_ptr, cos_row, S) + cols
        sin_out = row_starts(cos_out, T, S)
        if UNIFORM:
            alpha, beta = rotation_start(p, dt)
            cos_k = tl.zeros_like(p) + valid
            sin_k = tl.zeros_like(p)
            for k in range(T):
                _accumulate(cos_out, col_mask, tl.sum(cos_k, axis=1))
                _accumulate(sin_out, col_mask, tl.sum(sin_k, axis=1))
                cos_k, sin_k = rotation_step(alpha, beta, cos_k, sin_k, k, p, dt, valid, T)
                cos_out += S
                sin_out += S
        else:
            for k in range(T):
                sin_k, cos_k = sincos(tl.load(t_ptr + k) * p)
                _accumulate(cos_out, col_mask, tl.sum(cos_k * valid, axis=1))
                _accumulate(sin_out, col_mask, tl.sum(sin_k * valid, axis=1))
                cos_out += S
                sin_out += S
        # The next row block re-reads these sums, perhaps from other threads of the program.
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
        ecf_forward_kernel[(slice_tiles, splits)](
            x, kernel_directions(A, x), t, partials, N, D, S, x.stride(0), rows_per_split,
            float(dt),
            T=T,
            UNIFORM=dt > 0,
            BLOCK_N=config.block_n,
            BLOCK_S=config.block_s,
            BLOCK_D=config.block_d,
            INPUT_PRECISION=input_precision(x.dtype),
            UPCAST_BF16=interpreter_bf16(x),
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    return partials[:, 0].sum(0).T.contiguous(), partials[:, 1].sum(0).T.contiguous()
