"""The PyTorch backend: memory-bounded ECF sums in plain torch ops, on any device, no Triton.

x is [G, N, D]: G independent groups of N rows, each with its own sums, all projected on the
same directions. The projections `P = x @ A` are formed one block of [groups x rows x slices]
at a time (one matmul for every group) and turned into each group's cos/sin sums at once, so no
[G, N, S, T] (nor [G, N, S]) tensor ever exists: the extra memory is the fp32 copy of x, the
gradient, and a few blocks of at most `block_elements` numbers. The backward recomputes each
block instead of storing anything from the forward.

On a uniform grid (t_k = k * dt) the T values of cos/sin come from one cos and one sin
per projection by the Chebyshev recurrence, one in-place multiply-add per grid point; fp64 inputs
and other grids use direct trig on the given t.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

NAME = "torch"
BLOCK_ELEMENTS = 1 << 18
"""Default number of projections (rows x slices) per block: 1 MiB per fp32 temporary."""

RESTART_INTERVAL = 16
"""Grid points between restarts of the trig recurrence from direct cos/sin (see _grid_values)."""


def unavailable() -> str | None:
    """None: the PyTorch backend runs wherever torch does."""
    return None


def unsupported(x: torch.Tensor, n_points: int, dt: float) -> str | None:
    """None: the PyTorch backend takes every call (any device, float dtype, grid and groups)."""
    return None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 for fp64 input, fp32 for every other float dtype (bf16 and fp16 included)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _blocks(
    n_groups: int, n_rows: int, n_slices: int, block_elements: int
) -> Iterator[tuple[slice, slice]]:
    """(row range, slice range) pairs covering [n_rows, n_slices]; each block takes those rows of
    every group, n_groups x rows x slices <= block_elements (or a single row and slice)."""
    slices_per_block = min(n_slices, max(1, block_elements // (n_groups * n_rows)))
    rows_per_block = min(n_rows, max(1, block_elements // (n_groups * slices_per_block)))
    for s0 in range(0, n_slices, slices_per_block):
        for r0 in range(0, n_rows, rows_per_block):
            yield slice(r0, r0 + rows_per_block), slice(s0, s0 + slices_per_block)


def _recurrence_sign(k: int) -> float:
    return 1.0 if k % 4 < 2 else -1.0


def _direct_pair(P: torch.Tensor, t_k: float, sign: float, out: torch.Tensor) -> None:
    """out [2, *P.shape] = sign * (cos(t_k P), sin(t_k P)): a restart of the recurrence."""
    angles = P * t_k
    torch.cos(angles, out=out[0])
    torch.sin(angles, out=out[1])
    out.mul_(sign)


def _grid_values(
    P: torch.Tensor, t: torch.Tensor, dt: float
) -> Iterator[tuple[int, float, torch.Tensor]]:
    """For k = 0..T-1, (k, sign, pair) with pair [2, *P.shape] and
    (cos(t_k P), sin(t_k P)) = sign * (pair[0], pair[1]).

    P: a [groups, rows, slices] block. `pair` is overwritten by the next step: use it at once. With
    dt > 0 (and P not fp64) the Chebyshev recurrence f_{k+1} = 2 cos(u) f_k - f_{k-1},
    u = dt * P, runs in place on values stored with the signs + + - - (period 4),
    which makes each step a single addcmul_ over cos and sin together. Its fp32 error grows
    about as k^2, so it restarts from direct trig every RESTART_INTERVAL points (never on
    grids of up to RESTART_INTERVAL + 1 points, the default 17 included).
    """
    if dt <= 0 or P.dtype == torch.float64:
        for k in range(t.numel()):
            angles = P * t[k]
            yield k, 1.0, torch.stack([angles.cos(), angles.sin_()])
        return
    u = P * dt
    two_cos = u.cos().mul_(2.0)
    prev = torch.stack([torch.ones_like(u), torch.zeros_like(u)])
    cur = torch.stack([two_cos * 0.5, u.sin_()])
    yield 0, 1.0, prev
    for k in range(1, t.numel()):
        if k % RESTART_INTERVAL == 1 and k > 1:
            _direct_pair(P, k * dt, _recurrence_sign(k), cur)
            _direct_pair(P, (k - 1) * dt, _recurrence_sign(k - 1), prev)
        yield k, _recurrence_sign(k), cur
        prev.addcmul_(two_cos, cur, value=_recurrence_sign(k + 1) * _recurrence_sign(k))
        prev, cur = cur, prev


def project(x: torch.Tensor, A: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    """P [G, rows, cols] = x[:, rows] @ A[:, cols] for x [G, N, D]: one matmul for every group."""
    block = x[:, rows]
    return (block.reshape(-1, x.shape[2]) @ A[:, cols]).view(*block.shape[:2], -1)


def ecf_sums(
    x: torch.Tensor,
    A: torch.Tensor,
    t: torch.Tensor,
    dt: float = 0.0,
    block_elements: int = BLOCK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over each group's rows of cos and sin of t_k (x @ A).

    x: [G, N, D] any float dtype; A: [D, S]; t: [T]; dt > 0 declares t_k = k * dt. Returns
    (cos_sums, sin_sums), each [G, S, T] in fp32 (fp64 if x is fp64):
    cos_sums[g, s, k] = sum_n cos(t_k P[g, n, s]), sin_sums likewise with sin.
    """
    dtype = compute_dtype(x)
    x, A, t = x.to(dtype), A.to(dtype), t.to(dtype)
    sums = x.new_zeros(2, x.shape[0], t.numel(), A.shape[1])
    for rows, cols in _blocks(x.shape[0], x.shape[1], A.shape[1], block_elements):
        for k, sign, pair in _grid_values(project(x, A, rows, cols), t, dt):
            sums[:, :, k, cols].add_(pair.sum(2), alpha=sign)
    # Two fresh [G, S, T] tensors (a custom op's outputs may not share storage).
    return tuple(table.transpose(1, 2).clone(memory_format=torch.contiguous_format) for table in sums)


def grad_proj_coefficients(
    t: torch.Tensor, grad_cos: torch.Tensor, grad_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The coefficients of cos(t_k P) and sin(t_k P) in dP: t * grad_sin and -t * grad_cos,
    each [G, T, S] contiguous in t's dtype, from the [G, S, T] gradients of the cos and sin sums."""
    return (
        (t * grad_sin.to(t.dtype)).transpose(1, 2).contiguous(),
        (-t * grad_cos.to(t.dtype)).transpose(1, 2).contiguous(),
    )


def ecf_sums_backward(
    x: torch.Tensor,
    A: torch.Tensor,
    t: torch.Tensor,
    grad_cos: torch.Tensor,
    grad_sin: torch.Tensor,
    dt: float = 0.0,
    block_elements: int = BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Gradient of the ECF sums with respect to x, recomputing the projections.

    x: [G, N, D]; grad_cos, grad_sin: [G, S, T], the gradients of cos_sums and sin_sums. Returns
    dx [G, N, D] in x's dtype: dx[g] = dP[g] @ A^T with
    dP[g, n, s] = sum_k t_k (cos(t_k P) grad_sin - sin(t_k P) grad_cos)[g, n, s, k].
    """
    dtype = compute_dtype(x)
    xc, A, t = x.to(dtype), A.to(dtype), t.to(dtype)
    cos_coef, sin_coef = grad_proj_coefficients(t, grad_cos, grad_sin)
    grad_x = xc.new_zeros(xc.shape)
    for rows, cols in _blocks(x.shape[0], x.shape[1], A.shape[1], block_elements):
        P = project(xc, A, rows, cols)
        grad_proj = torch.zeros_like(P)
        for k, sign, pair in _grid_values(P, t, dt):
            grad_proj.addcmul_(pair[0], cos_coef[:, None, k, cols], value=sign)
            grad_proj.addcmul_(pair[1], sin_coef[:, None, k, cols], value=sign)
        grad_x[:, rows] += (grad_proj.view(-1, P.shape[2]) @ A[:, cols].T).view(grad_proj.shape[:2] + (-1,))
    return grad_x.to(x.dtype)
