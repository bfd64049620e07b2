"""Memory-bounded pure-PyTorch ECF sums: runs on any device, no Triton.

The projections `P = x @ A` are formed one block of [rows x slices] at a time and turned into
cos/sin sums at once, so no [N, S, T] (nor [N, S]) tensor ever exists: the extra memory is the
fp32 copy of x, the gradient, and one block of at most `block_elements` x T numbers. The backward
recomputes each block instead of storing anything from the forward.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

BLOCK_ELEMENTS = 1 << 16
"""Default number of projections (rows x slices) per block; x T for the trig temporaries."""


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 for fp64 input, fp32 for every other float dtype (bf16 and fp16 included)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _blocks(n_rows: int, n_slices: int, block_elements: int) -> Iterator[tuple[slice, slice]]:
    """(row range, slice range) pairs covering [n_rows, n_slices], each <= block_elements."""
    slices_per_block = min(n_slices, max(1, block_elements // n_rows))
    rows_per_block = min(n_rows, max(1, block_elements // slices_per_block))
    for s0 in range(0, n_slices, slices_per_block):
        for r0 in range(0, n_rows, rows_per_block):
            yield slice(r0, r0 + rows_per_block), slice(s0, s0 + slices_per_block)


def ecf_sums(
    x: torch.Tensor, A: torch.Tensor, t: torch.Tensor, block_elements: int = BLOCK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over rows of cos and sin of t_k (x @ A).

    x: [N, D] any float dtype; A: [D, S]; t: [T]. Returns (C, Z), each [S, T] in fp32 (fp64 if
    x is fp64): C[s, k] = sum_n cos(t_k P[n, s]), Z[s, k] = sum_n sin(t_k P[n, s]).
    """
    dtype = compute_dtype(x)
    x, A, t = x.to(dtype), A.to(dtype), t.to(dtype)
    cos_sums = x.new_zeros(A.shape[1], t.numel())
    sin_sums = x.new_zeros(A.shape[1], t.numel())
    for rows, cols in _blocks(x.shape[0], A.shape[1], block_elements):
        angles = (x[rows] @ A[:, cols]).unsqueeze(-1) * t
        cos_sums[cols] += angles.cos().sum(0)
        sin_sums[cols] += angles.sin_().sum(0)
    return cos_sums, sin_sums


def ecf_sums_backward(
    x: torch.Tensor,
    A: torch.Tensor,
    t: torch.Tensor,
    grad_cos: torch.Tensor,
    grad_sin: torch.Tensor,
    block_elements: int = BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Gradient of the ECF sums with respect to x, recomputing the projections.

    grad_cos, grad_sin: [S, T], the gradients of C and Z. Returns dx [N, D] in x's dtype:
    dx = dP @ A^T with dP[n, s] = sum_k t_k (cos(t_k P) grad_sin - sin(t_k P) grad_cos)[n, s, k].
    """
    dtype = compute_dtype(x)
    xc, A, t = x.to(dtype), A.to(dtype), t.to(dtype)
    sin_coef = -t * grad_cos.to(dtype)
    cos_coef = t * grad_sin.to(dtype)
    grad_x = xc.new_zeros(xc.shape)
    for rows, cols in _blocks(x.shape[0], A.shape[1], block_elements):
        angles = (xc[rows] @ A[:, cols]).unsqueeze(-1) * t
        grad_proj = (angles.cos() * cos_coef[cols]).sum(-1)
        grad_proj += (angles.sin_() * sin_coef[cols]).sum(-1)
        grad_x[rows] += grad_proj @ A[:, cols].T
    return grad_x.to(x.dtype)
