"""Device functions shared by the forward and backward kernels."""

import triton
import triton.language as tl


@triton.jit
def projection_tile(
    x_ptr,
    a_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    D,
    stride_xn,
    stride_xd,
    stride_ad,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
):
    """P^T = A[:, cols]^T @ x[rows]^T: a [BLOCK_S, BLOCK_N] fp32 tile, zero where masked.

    Slices run along the tile's first axis and rows along its second: in the MMA layouts warps
    split the first axis only, so sums over rows (axis 1) stay within a warp (no shared memory).

    x is fp32/bf16/fp16 with any strides; A is fp32, rounded to x's dtype so that 16-bit inputs
    run on tensor cores at full rate (fp32 inputs use INPUT_PRECISION, e.g. "tf32x3").
    UPCAST_BF16 multiplies bf16 tiles in fp32, for Triton's interpreter, which mis-computes bf16
    dots and truncates fp32 -> bf16 casts: the launcher then passes A already rounded to bf16.
    """
    acc = tl.zeros((BLOCK_S, BLOCK_N), dtype=tl.float32)
    row_offsets = rows.to(tl.int64)[None, :] * stride_xn
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        x_tile = tl.load(
            x_ptr + row_offsets + d[:, None] * stride_xd,
            mask=d_mask[:, None] & row_mask[None, :],
            other=0.0,
        )
        a_tile = tl.load(
            a_ptr + d[None, :] * stride_ad + cols[:, None],
            mask=col_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if UPCAST_BF16:
            x_tile = x_tile.to(tl.float32)
        else:
            a_tile = a_tile.to(x_tile.dtype)
        acc = tl.dot(a_tile, x_tile, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def chebyshev_start(p, dt, weight):
    """Seeds of the recurrence for cos/sin(k dt p), k = 0, 1, ...: (2 cos(u), f_-1, f_0) for cos
    and for sin, u = dt p, all scaled by weight (0 on padded rows makes every term 0)."""
    u = p * dt
    two_cos_u = 2.0 * tl.cos(u)
    cos_prev = 0.5 * two_cos_u * weight  # cos(-u)
    sin_prev = -tl.sin(u) * weight  # sin(-u)
    cos_cur = tl.zeros_like(p) + weight
    sin_cur = tl.zeros_like(p)
    return two_cos_u, cos_prev, cos_cur, sin_prev, sin_cur


@triton.jit
def chebyshev_step(two_cos_u, prev, cur):
    """(f_k, f_{k+1}) from (f_{k-1}, f_k): f_{k+1} = 2 cos(u) f_k - f_{k-1}."""
    return cur, two_cos_u * cur - prev
