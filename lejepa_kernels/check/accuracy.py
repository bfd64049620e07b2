"""Accuracy checks: one backend's ECF sums, SIGReg loss and gradients against an fp64 oracle.

Two kinds of check, each run twice to see that identical calls give identical bits:

- "sums": `ecf_sums(x, A, t, backend)` and its gradient for random seeds dL/dC, dL/dZ, against
  the same sums in fp64. The directions A are rounded to values that bf16 and fp16 hold exactly,
  so every backend sees the same inputs whatever it rounds A to, and the oracle is exact for
  them: what is left is fp32 arithmetic, and the tolerances are tight enough that a lost row
  block, a bad mask or a wrong offset fails. At large S the comparison runs on a sample of
  slices (one in every 32); the gradient seeds are zero elsewhere, so dx is exact for it too.
- "loss": `sliced_epps_pulley(x, step, ...)` and dloss/dx against the seed's statistic on the
  same (rounded) x and the same directions (the seed's, or blockwise) in fp64: the error must be
  no worse than the seed's own error in x's dtype (the README's contract), or than the change
  that rounding the directions to x's dtype makes (the seed does that; some backends do), plus a
  slack for the trig recurrence and one rounding of the result.

The cases and their error bounds are in `cases.py`.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict
from typing import Any

import torch

from ..blockwise import blockwise_directions
from ..functional import ecf_sums, sliced_epps_pulley
from ..reference import EppsPulley, quadrature, random_directions
from .cases import (
    BF16,
    DTYPE_NAMES,
    FP64,
    LOSS_STEP,
    T_MAX,
    Case,
    loss_slacks,
    sample_columns,
    sums_tolerances,
)


def _generator(case: Case, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(zlib.crc32(repr(case).encode()))


def make_embeddings(case: Case, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    """x [N, D] ([G, N, D] for groups) in the case's dtype and layout: standard normal times
    scale, rounded once."""
    g = _generator(case, device)
    if case.layout == "transposed":
        return (scale * torch.randn(case.d, case.n, generator=g, device=device)).to(case.dtype).T
    if case.layout == "strided":
        base = scale * torch.randn(2 * case.n, 2 * case.d, generator=g, device=device)
        return base.to(case.dtype)[::2, ::2]
    x = (scale * torch.randn(case.groups * case.n, case.d, generator=g, device=device)).to(case.dtype)
    return x.view(case.groups, case.n, case.d) if case.groups > 1 else x


def exact_directions(dim: int, num_slices: int, device: torch.device) -> torch.Tensor:
    """Unit-norm-ish directions [dim, num_slices] fp32 whose entries bf16 and fp16 hold exactly:
    the seed's directions rounded to bf16, entries below fp16's normal range set to zero."""
    A = random_directions(dim, num_slices, 0, device)
    A.masked_fill_(A.abs() < 2.0**-14, 0.0)
    return A.to(BF16).float()


def grid(case: Case, device: torch.device) -> tuple[torch.Tensor, float]:
    """(t [T] fp32, dt): the seed's grid, or a non-uniform one (dt 0)."""
    if case.grid == "uniform":
        return quadrature(T_MAX, case.t)[0].to(device), T_MAX / (case.t - 1)
    return (T_MAX * torch.linspace(0, 1, case.t, dtype=FP64) ** 1.5).float().to(device), 0.0


def oracle_sums(
    x: torch.Tensor,
    A: torch.Tensor,
    t: torch.Tensor,
    grad_cos: torch.Tensor,
    grad_sin: torch.Tensor,
    max_angles: int = 1 << 25,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cos_sums, sin_sums) [S, T] and dx [N, D] in fp64 for x [N, D], A [D, S], t [T], seeds [S, T]:
    dx = dP @ A^T with dP[n, s] = sum_k t_k (cos(t_k P) grad_sin - sin(t_k P) grad_cos)[s, k].
    Computed over blocks of slices of at most max_angles angles."""
    x, t = x.double(), t.double()
    n_rows, n_slices, n_points = x.shape[0], A.shape[1], t.numel()
    cos_sums = torch.empty(n_slices, n_points, dtype=FP64, device=x.device)
    sin_sums = torch.empty_like(cos_sums)
    dx = torch.zeros(x.shape, dtype=FP64, device=x.device)
    width = max(1, max_angles // (n_rows * n_points))
    for s0 in range(0, n_slices, width):
        cols = slice(s0, s0 + width)
        A_blk = A[:, cols].double()
        angles = (x @ A_blk).unsqueeze(-1) * t
        cos, sin = angles.cos(), angles.sin_()
        cos_sums[cols], sin_sums[cols] = cos.sum(0), sin.sum(0)
        dP = (cos * (t * grad_sin[cols].double())).sub_(sin * (t * grad_cos[cols].double())).sum(-1)
        dx += dP @ A_blk.T
    return cos_sums, sin_sums, dx


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_abs(a: torch.Tensor) -> float:
    return a.abs().max().item()


def run_sums(case: Case, backend: str, device: torch.device) -> dict[str, Any]:
    """The ECF sums and their gradient against fp64: errors, bounds and determinism."""
    x = make_embeddings(case, device)
    A = exact_directions(case.d, case.s, device)
    t, dt = grid(case, device)
    cols = sample_columns(case.s).to(device) if case.compares_sample else None
    g = _generator(case, device)
    seeds = torch.randn(2, case.s, case.t, generator=g, device=device)
    if cols is not None:  # dL/dC and dL/dZ vanish off the sample: dx is then exact for it
        kept = torch.zeros(case.s, dtype=torch.bool, device=device)
        kept[cols] = True
        seeds *= kept[None, :, None]
    grad_cos, grad_sin = seeds

    def call():
        xr = x.detach().requires_grad_()
        cos_sums, sin_sums = ecf_sums(xr, A, t, backend, dt=dt)
        torch.autograd.backward((cos_sums, sin_sums), (grad_cos, grad_sin))
        return cos_sums.detach(), sin_sums.detach(), xr.grad

    first = call()
    second = call()
    _synchronize(device)
    deterministic = all(torch.equal(a, b) for a, b in zip(first, second))
    del second
    cos_sums, sin_sums, dx = first
    if cols is not None:
        cos_sums, sin_sums = cos_sums[cols], sin_sums[cols]
        A_cmp, grad_cos, grad_sin = A[:, cols], grad_cos[cols], grad_sin[cols]
    else:
        A_cmp = A
    cos_true, sin_true, dx_true = oracle_sums(x, A_cmp, t, grad_cos, grad_sin)
    forward_error = max(_max_abs(cos_sums.double() - cos_true), _max_abs(sin_sums.double() - sin_true)) / case.n
    gradient_error = _max_abs(dx.double() - dx_true) / max(_max_abs(dx_true), 1e-300)
    forward_tol, gradient_tol = sums_tolerances(case)
    return dict(
        forward_error=forward_error,
        forward_tolerance=forward_tol,
        gradient_error=gradient_error,
        gradient_tolerance=gradient_tol,
        deterministic=deterministic,
        compared_slices=case.s if cols is None else cols.numel(),
        passed=forward_error <= forward_tol and gradient_error <= gradient_tol and deterministic,
    )


def loss_directions(case: Case, device: torch.device) -> torch.Tensor:
    """The directions [D, S] fp32 that `sliced_epps_pulley` draws at LOSS_STEP for the case."""
    if case.directions == "blockwise":
        return blockwise_directions(case.d, case.s, LOSS_STEP, device=device)
    return random_directions(case.d, case.s, LOSS_STEP, device)


def _seed_loss_and_grad(x: torch.Tensor, A: torch.Tensor, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's loss and dloss/dx at x (in x's dtype) on directions A, in fp64: its statistic
    on `x @ A.to(x.dtype)`, meaned over groups and slices, as its module computes it."""
    statistic = EppsPulley(T_MAX, case.t).to(x.device)
    xr = x.detach().requires_grad_()
    loss = statistic(xr @ A.to(x.dtype)).mean()
    loss.backward()
    return loss.detach().double(), xr.grad.double()


def run_loss(case: Case, backend: str, device: torch.device) -> dict[str, Any]:
    """SIGReg and dloss/dx against the fp64 seed on the same x: the error may be the seed's own
    error in x's dtype, or what rounding the directions to x's dtype changes (the seed rounds
    them so; a backend may or may not), plus a slack."""
    x = make_embeddings(case, device, scale=0.7)
    A = loss_directions(case, device)

    def call():
        xr = x.detach().requires_grad_()
        loss = sliced_epps_pulley(xr, LOSS_STEP, case.s, T_MAX, case.t, backend, directions=case.directions)
        loss.backward()
        return loss.detach(), xr.grad

    first = call()
    second = call()
    _synchronize(device)
    deterministic = all(torch.equal(a, b) for a, b in zip(first, second))
    loss, grad = first[0].double(), first[1].double()
    del second, first
    true_loss, true_grad = _seed_loss_and_grad(x.double(), A, case)
    seed_loss, seed_grad = _seed_loss_and_grad(x, A, case)
    loss_scale, grad_scale = true_loss.abs().item(), max(_max_abs(true_grad), 1e-300)
    seed_errors = ((seed_loss - true_loss).abs().item() / loss_scale, _max_abs(seed_grad - true_grad) / grad_scale)
    rounding_errors = (0.0, 0.0)
    if case.dtype.itemsize < 4:
        rounded_loss, rounded_grad = _seed_loss_and_grad(x.double(), A.to(case.dtype), case)
        rounding_errors = (
            (rounded_loss - true_loss).abs().item() / loss_scale,
            _max_abs(rounded_grad - true_grad) / grad_scale,
        )
    errors = ((loss - true_loss).abs().item() / loss_scale, _max_abs(grad - true_grad) / grad_scale)
    tolerances = [
        max(seed, rounding) + slack for seed, rounding, slack in zip(seed_errors, rounding_errors, loss_slacks(case))
    ]
    return dict(
        forward_error=errors[0],
        forward_tolerance=tolerances[0],
        gradient_error=errors[1],
        gradient_tolerance=tolerances[1],
        seed_loss_error=seed_errors[0],
        seed_gradient_error=seed_errors[1],
        rounded_directions_loss_error=rounding_errors[0],
        rounded_directions_gradient_error=rounding_errors[1],
        deterministic=deterministic,
        compared_slices=case.s,
        passed=errors[0] <= tolerances[0] and errors[1] <= tolerances[1] and deterministic,
    )


def run_case(case: Case, backend: str, device: str) -> dict[str, Any]:
    """Run one check; never raises. device: "cpu", "cuda" or "interpreter" (Triton on CPU
    tensors; the caller's process must have TRITON_INTERPRET=1). The result holds the case's
    fields, the errors and their bounds, `deterministic`, `passed`, `seconds`, and `error`
    (the exception's text) when the computation failed."""
    result = dict(asdict(case), dtype=DTYPE_NAMES[case.dtype], backend=backend, device=device)
    result["description"] = case.describe()
    torch_device = torch.device("cuda" if device == "cuda" else "cpu")
    started = time.perf_counter()
    try:
        run = run_sums if case.kind == "sums" else run_loss
        result.update(run(case, backend, torch_device))
    except Exception as error:  # a failed check is a result, not the end of the command
        result.update(passed=False, error=f"{type(error).__name__}: {error}")
    result["seconds"] = time.perf_counter() - started
    return result
