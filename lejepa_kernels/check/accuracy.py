"""Accuracy checks: one backend's ECF sums, SIGReg loss and gradients against an fp64 oracle.

Two kinds of check, each run twice to see that identical calls give identical bits:

- "sums": `ecf_sums(x, A, t, backend)` and its gradient for random seeds dL/dC, dL/dZ, against
  the same sums in fp64. The directions A are rounded to values that bf16 and fp16 hold exactly,
  so every backend sees the same inputs whatever it rounds A to, and the oracle is exact for
  them: what is left is fp32 arithmetic, and the tolerances are tight enough that a lost row
  block, a bad mask or a wrong offset fails. At large S the comparison runs on a sample of
  slices (one in every 32); the gradient seeds are zero elsewhere, so dx is exact for it too.
- "loss": `sliced_epps_pulley(x, step, ...)` and dloss/dx against the seed's module on the same
  (rounded) x in fp64: the error must be no worse than the seed's own error in x's dtype (the
  README's contract), or than the change that rounding the directions to x's dtype makes (the
  seed does that; some backends do), plus a slack for the trig recurrence and one rounding of
  the result.

Tolerances (u: the unit roundoff of a dtype, 2^-24 for fp32, 2^-8 for bf16, 2^-11 for fp16):
- trig: a cos/sin value at the k-th point of the recurrence is off by about k^2 roundings
  (1.1e-5 at T = 17, 5.9e-4 at T = 129 measured in fp32), so 2 (T - 1)^2 u of the compute dtype
  (fp32; fp64 for fp64 input) bounds any value, and so the mean over rows;
- a sum of L terms adds a random walk of L roundings: 2 sqrt(L) u of the compute dtype;
- a gradient returned in a 16-bit dtype, possibly through a dP held in it: 4 u(dtype).
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ..backends import TABLE
from ..functional import ecf_sums, sliced_epps_pulley
from ..reference import EppsPulley, SlicedEppsPulley, quadrature, random_directions

T_MAX = 3.0
LOSS_STEP = 3
"""The training step whose directions the loss checks use (any step would do)."""
SAMPLE_GROUP = 32
"""Sampled checks compare one slice in every SAMPLE_GROUP consecutive slices."""
MAX_SAMPLE = 1 << 17
"""At most this many sampled slices (groups evenly spread beyond it)."""
FULL_COMPARISON_MAX_S = 16384
"""Checks with more slices than this are compared on a sample."""
DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float64: "fp64",
}
FP32, BF16, FP16, FP64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


@dataclass(frozen=True)
class Case:
    """One accuracy check: what is computed, in which dtype, on which shapes.

    kind: "sums" (ecf_sums) or "loss" (sliced_epps_pulley); n, d, s, t: rows, features,
    slices, grid points; grid: "uniform" (t_k = k dt, the recurrence) or "arbitrary" (direct
    trig; sums only); layout of x: "contiguous", "transposed" (a [D, N] tensor's transpose) or
    "strided" (every other row and column); sampled: compare a sample of slices even when S is
    small; label: the launch path the shape is there for.
    """

    kind: str
    dtype: torch.dtype
    n: int
    d: int
    s: int
    t: int = 17
    grid: str = "uniform"
    layout: str = "contiguous"
    sampled: bool = False
    label: str = ""

    def describe(self) -> str:
        """E.g. "sums bf16 N=37 D=24 S=19 T=17 arbitrary grid, transposed x (label)"; the
        seed's uniform grid and contiguous x go unsaid."""
        words = [self.kind, DTYPE_NAMES[self.dtype], f"N={self.n} D={self.d} S={self.s} T={self.t}"]
        notes = [f"{self.grid} grid"] if self.grid != "uniform" else []
        notes += [f"{self.layout} x"] if self.layout != "contiguous" else []
        notes += ["sampled slices"] if self.compares_sample else []
        notes += [self.label] if self.label else []
        return " ".join(words) + (f" ({', '.join(notes)})" if notes else "")

    @property
    def compares_sample(self) -> bool:
        return self.sampled or self.s > FULL_COMPARISON_MAX_S


def _table(rows: tuple[int, int, int], odd: tuple[int, int, int], loss: tuple[int, int, int]) -> list[Case]:
    """Every dtype on the uniform grid at `rows` shapes, the arbitrary grid, non-contiguous x
    and odd shapes at `odd`, the smallest problem, a long grid, and the loss in every dtype."""
    return [
        *(Case("sums", dtype, *rows) for dtype in (FP32, BF16, FP16)),
        Case("sums", FP32, *rows, grid="arbitrary"),
        Case("sums", BF16, *odd, grid="arbitrary"),
        Case("sums", FP32, *odd, layout="transposed"),
        Case("sums", FP16, *odd, layout="strided"),
        Case("sums", FP32, 2, 3, 1, t=3, label="smallest"),
        Case("sums", BF16, 19, 5, 17, t=65, label="long grid"),
        *(Case("loss", dtype, *loss) for dtype in (FP32, BF16, FP16)),
        Case("loss", FP32, *odd, layout="transposed"),
    ]


SMALL_CASES = _table((300, 96, 257), (37, 24, 19), (256, 64, 128)) + [
    Case("sums", BF16, 67, 5, 33, t=129, label="longest grid of the CPU kernel"),
]
"""Every backend, CPU or CUDA: odd sizes so that every tile has a masked edge."""
INTERPRETER_CASES = _table((70, 40, 70), (37, 24, 19), (37, 16, 19))
"""Triton in its CPU interpreter, where each program runs in Python: two row blocks, two slice
tiles and two feature blocks of the kernels' 64 x 64 x 32 tiles, each with a masked edge."""
QUICK_CASES = _table((37, 24, 19), (37, 24, 19), (37, 16, 19))
"""--quick, every backend."""


def small_cases(backend: str, device: str, quick: bool = False) -> list[Case]:
    """The small-shape table of a backend on a device ("cpu", "cuda" or "interpreter": Triton
    on CPU tensors), less the cases the backend does not take. The PyTorch path also takes
    fp64."""
    if quick:
        cases = list(QUICK_CASES)
    else:
        cases = list(INTERPRETER_CASES if device == "interpreter" else SMALL_CASES)
    if device != "interpreter":
        cases.append(Case("sums", FP32, 37, 24, 300, sampled=True))
    if backend == "torch":
        cases.append(replace(next(c for c in cases if c.kind == "loss"), dtype=FP64))
    if device != "cpu":
        return cases
    return [case for case in cases if _takes_on_cpu(backend, case)]


def _takes_on_cpu(backend: str, case: Case) -> bool:
    """Whether the backend takes the case on CPU tensors (the native kernel: uniform grids)."""
    probe = torch.empty(0, case.d, dtype=case.dtype)
    dt = 1.0 if case.grid == "uniform" else 0.0
    return TABLE[backend].unsupported(probe, case.t, dt) is None


CUDA_LARGE_CASES = [
    Case("sums", BF16, 8192, 512, 8192, label="paper workload"),
    Case("sums", FP32, 8192, 512, 8192, label="paper workload"),
    Case("loss", BF16, 8192, 512, 8192, label="paper workload"),
    Case("sums", BF16, 65536, 256, 256, label="many row splits"),
    Case("sums", BF16, 8192, 512, 65536, label="long row walk"),
    Case("sums", FP16, 4, 8, 2_200_000, label="backward grid at its 65535 limit"),
    Case("sums", BF16, 65536, 1024, 1_048_576, label="2^20 slices"),
    Case("sums", BF16, 128, 2048, 1_100_000, label="D*S > 2^31: 64-bit offsets"),
]
"""Triton on CUDA: every launch path at full size (S > 16384 compared on a sample)."""


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon: the largest relative error of one rounding to dtype."""
    return torch.finfo(dtype).eps / 2


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the backends compute in for inputs of `dtype`: fp64 for fp64, else fp32."""
    return FP64 if dtype == FP64 else FP32


def trig_tolerance(n_points: int, dtype: torch.dtype) -> float:
    """Error bound of one cos/sin value on a grid of n_points (the recurrence's k^2 growth)."""
    return 2 * max(n_points - 1, 2) ** 2 * unit_roundoff(compute_dtype(dtype))


def sum_tolerance(length: int, dtype: torch.dtype) -> float:
    """Relative error bound of a sum of `length` terms in the compute dtype (a random walk)."""
    return 2 * math.sqrt(length) * unit_roundoff(compute_dtype(dtype))


def sums_tolerances(case: Case) -> tuple[float, float]:
    """(forward, gradient) bounds of a sums check: max |cos_sums - exact| / N (sin_sums alike) and
    max |dx - dx*| / max |dx*|."""
    trig = trig_tolerance(case.t, case.dtype)
    forward = trig + sum_tolerance(case.n, case.dtype)
    gradient = trig + sum_tolerance(case.s, case.dtype) + 4 * unit_roundoff(case.dtype)
    return forward, gradient


def loss_slacks(case: Case) -> tuple[float, float]:
    """(loss, gradient) slack over the seed's own relative error in the same dtype."""
    trig = trig_tolerance(case.t, case.dtype)
    return trig, trig + 2 * unit_roundoff(case.dtype)


def sample_columns(n_slices: int) -> torch.Tensor:
    """Sorted slice indices: one in every SAMPLE_GROUP (its position in the group varying), at
    most MAX_SAMPLE groups evenly spread, and the first and last slice. int64 [<= MAX_SAMPLE + 2]."""
    groups = torch.arange(0, n_slices, SAMPLE_GROUP)
    if groups.numel() > MAX_SAMPLE:
        groups = groups[torch.linspace(0, groups.numel() - 1, MAX_SAMPLE).round().long()]
    picked = groups + (groups // SAMPLE_GROUP * 13) % SAMPLE_GROUP
    ends = torch.tensor([0, n_slices - 1])
    return torch.unique(torch.cat([picked.clamp(max=n_slices - 1), ends]))


def _generator(case: Case, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(zlib.crc32(repr(case).encode()))


def make_embeddings(case: Case, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    """x [N, D] in the case's dtype and layout: standard normal times scale, rounded once."""
    g = _generator(case, device)
    if case.layout == "transposed":
        return (scale * torch.randn(case.d, case.n, generator=g, device=device)).to(case.dtype).T
    if case.layout == "strided":
        base = scale * torch.randn(2 * case.n, 2 * case.d, generator=g, device=device)
        return base.to(case.dtype)[::2, ::2]
    return (scale * torch.randn(case.n, case.d, generator=g, device=device)).to(case.dtype)


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


def _seed_loss_and_grad(x: torch.Tensor, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's loss and dloss/dx at x (in x's dtype), in fp64."""
    seed = SlicedEppsPulley(case.s, t_max=T_MAX, n_points=case.t).to(x.device)
    seed.global_step.fill_(LOSS_STEP)
    xr = x.detach().requires_grad_()
    loss = seed(xr)
    loss.backward()
    return loss.detach().double(), xr.grad.double()


def _rounded_directions_loss_and_grad(x64: torch.Tensor, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's statistic in fp64 with its directions rounded to the case's dtype first (as the
    seed rounds them: `x @ A.to(x.dtype)`): the part of the error the input rounding explains."""
    statistic = EppsPulley(T_MAX, case.t).to(x64.device).double()
    A = random_directions(case.d, case.s, LOSS_STEP, x64.device).to(case.dtype).double()
    xr = x64.detach().requires_grad_()
    loss = statistic(xr @ A).mean()
    loss.backward()
    return loss.detach(), xr.grad


def run_loss(case: Case, backend: str, device: torch.device) -> dict[str, Any]:
    """SIGReg and dloss/dx against the fp64 seed on the same x: the error may be the seed's own
    error in x's dtype, or what rounding the directions to x's dtype changes (the seed rounds
    them so; a backend may or may not), plus a slack."""
    x = make_embeddings(case, device, scale=0.7)

    def call():
        xr = x.detach().requires_grad_()
        loss = sliced_epps_pulley(xr, LOSS_STEP, case.s, T_MAX, case.t, backend)
        loss.backward()
        return loss.detach(), xr.grad

    first = call()
    second = call()
    _synchronize(device)
    deterministic = all(torch.equal(a, b) for a, b in zip(first, second))
    loss, grad = first[0].double(), first[1].double()
    del second, first
    true_loss, true_grad = _seed_loss_and_grad(x.double(), case)
    seed_loss, seed_grad = _seed_loss_and_grad(x, case)
    loss_scale, grad_scale = true_loss.abs().item(), max(_max_abs(true_grad), 1e-300)
    seed_errors = ((seed_loss - true_loss).abs().item() / loss_scale, _max_abs(seed_grad - true_grad) / grad_scale)
    rounding_errors = (0.0, 0.0)
    if case.dtype.itemsize < 4:
        rounded_loss, rounded_grad = _rounded_directions_loss_and_grad(x.double(), case)
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
