"""Device functions shared by the forward and backward kernels."""

import triton
import triton.language as tl


@triton.jit
def row_starts(base_ptr, rows, row_stride):
    """Pointers to rows `rows` (int32, any shape) of a matrix at base_ptr whose rows are
    row_stride elements apart. The offsets are formed in 64 bits: rows * row_stride passes
    2^31 in large inputs (D * S directions, T * S sums, N * D embeddings)."""
    return base_ptr + tl.cast(rows, tl.int64) * row_stride


@triton.jit
def _projection_tile(
    x_ptr,
    a_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    D,
    S,
    stride_xn,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
):
    """P^T = A[:, cols]^T @ x[rows]^T: a [BLOCK_S, BLOCK_N] fp32 tile, zero where masked.

    Slices run along the tile's first axis and rows along its second: in the MMA layouts warps
    split the first axis only, so sums over rows (axis 1) stay within a warp (no shared memory).

    x is fp32/bf16/fp16, rows stride_xn elements apart, features contiguous; A is [D, S]
    contiguous, in x's dtype (the launcher rounds it once per call), so that 16-bit inputs run on
    tensor cores at full rate and read half the bytes (fp32 inputs use INPUT_PRECISION, e.g.
    "tf32x3"). UPCAST_BF16 multiplies bf16 tiles in fp32, for Triton's interpreter, which
    mis-computes bf16 dots: A then comes as fp32 holding bf16-rounded values.
    """
    acc = tl.zeros((BLOCK_S, BLOCK_N), dtype=tl.float32)
    x_rows = row_starts(x_ptr, rows, stride_xn)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        x_tile = tl.load(
            x_rows[None, :] + d[:, None],
            mask=d_mask[:, None] & row_mask[None, :],
            other=0.0,
        )
        a_tile = tl.load(
            row_starts(a_ptr, d, S)[None, :] + cols[:, None],
            mask=col_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if UPCAST_BF16:
            x_tile = x_tile.to(tl.float32)
        acc = tl.dot(a_tile, x_tile, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def sincos(angle):
    """(sin, cos) of fp32 angles, sharing one reduction: angle = q pi/2 + r, |r| <= pi/4, with pi/2
    split in pieces of at most 8 significant bits (exact products for |q| < 2^16, so the same
    result with or without FMA), then minimax polynomials in r (Cephes' sinf/cosf) and the
    quadrant's signs. Absolute error about 1e-7 for |angle| < 1e5; past it, about the rounding
    of the fp32 angle itself. tl.sin/tl.cos also cover huge angles exactly, with a slow path
    whose local array and long live ranges make ptxas spill registers in these kernels."""
    quadrant = tl.floor(angle * 0.6366197723675814 + 0.5)
    r = angle - quadrant * 1.5703125
    r = r - quadrant * 4.84466552734375e-4
    r = r + quadrant * 6.407499313354492e-7
    r = r - quadrant * 9.92093629470503e-10
    r2 = r * r
    sin_r = r + r * r2 * (-1.6666654611e-1 + r2 * (8.3321608736e-3 - r2 * 1.9515295891e-4))
    cos_r = 1.0 - 0.5 * r2 + r2 * r2 * (
        4.166664568298827e-2 + r2 * (-1.388731625493765e-3 + r2 * 2.443315711809948e-5)
    )
    q = quadrant.to(tl.int32)
    odd = (q & 1) != 0
    sin_abs = tl.where(odd, cos_r, sin_r)
    cos_abs = tl.where(odd, sin_r, cos_r)
    sin = tl.where((q & 2) != 0, -sin_abs, sin_abs)
    cos = tl.where(((q + 1) & 2) != 0, -cos_abs, cos_abs)
    return sin, cos


@triton.jit
def _rotation_start(p, dt):
    """(alpha, beta) = (2 sin^2(u / 2), sin(u)), u = dt p: the rotation by u in the form
    c' = c - (alpha c + beta s), s' = s - (alpha s - beta c). Unlike cos(u), alpha keeps its
    relative precision for small u, so the recurrence drifts little (Numerical Recipes 5.4)."""
    sin_half, cos_half = sincos(0.5 * dt * p)
    return 2.0 * sin_half * sin_half, 2.0 * sin_half * cos_half


@triton.jit
def _rotation_step(alpha, beta, cos_k, sin_k):
    """(cos, sin)((k + 1) u) from (cos, sin)(k u), any common weight carried along (1, or 0 on
    padded rows)."""
    return cos_k - (alpha * cos_k + beta * sin_k), sin_k - (alpha * sin_k - beta * cos_k)


@triton.jit
def _chunk_start(p, k0, dt, weight, SINGLE_CHUNK: tl.constexpr):
    """weight * (cos, sin)(k0 dt p): the first point of a chunk of the uniform grid, where the
    recurrence (re)starts from direct trig; (weight, 0) without trig when the grid is one chunk
    (k0 = 0). Chunks are short (`config.grid_chunk`), so the error of any value stays that of a
    few rotations, whatever the grid's length."""
    if SINGLE_CHUNK:
        return tl.zeros_like(p) + weight, tl.zeros_like(p)
    sin_0, cos_0 = sincos((k0 * dt) * p)
    return cos_0 * weight, sin_0 * weight
