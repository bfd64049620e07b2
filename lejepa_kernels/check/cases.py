"""The checks of `lejepa-kernels check`: their cases (what is computed, in which dtype, on which
shapes), the tables of cases per backend and device, and the error bounds they are held to.

Tolerances (u: the unit roundoff of a dtype, 2^-24 for fp32, 2^-8 for bf16, 2^-11 for fp16):
- trig: a cos/sin value at the k-th point of the recurrence is off by about k^2 roundings
  (1.1e-5 at T = 17, 5.9e-4 at T = 129 measured in fp32), so 2 (T - 1)^2 u of the compute dtype
  (fp32; fp64 for fp64 input) bounds any value, and so the mean over rows;
- a sum of L terms adds a random walk of L roundings: 2 sqrt(L) u of the compute dtype;
- a gradient returned in a 16-bit dtype, possibly through a dP held in it: 4 u(dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..backends import TABLE

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
    small; label: the launch path the shape is there for; groups: x is [groups, N, D] (loss
    only, contiguous); directions: "seed" or "blockwise" (loss only).
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
    groups: int = 1
    directions: str = "seed"

    def __post_init__(self) -> None:
        if (self.groups > 1 or self.directions != "seed") and self.kind != "loss":
            raise ValueError(f"groups and directions apply to loss checks, got {self}")
        if self.groups > 1 and self.layout != "contiguous":
            raise ValueError(f"groups of rows are made contiguous, got {self}")

    def describe(self) -> str:
        """E.g. "sums bf16 N=37 D=24 S=19 T=17 arbitrary grid, transposed x (label)"; the
        seed's uniform grid and contiguous x go unsaid."""
        groups = f"G={self.groups} " if self.groups > 1 else ""
        words = [self.kind, DTYPE_NAMES[self.dtype], f"{groups}N={self.n} D={self.d} S={self.s} T={self.t}"]
        notes = [f"{self.grid} grid"] if self.grid != "uniform" else []
        notes += [f"{self.layout} x"] if self.layout != "contiguous" else []
        notes += [f"{self.directions} directions"] if self.directions != "seed" else []
        notes += ["sampled slices"] if self.compares_sample else []
        notes += [self.label] if self.label else []
        return " ".join(words) + (f" ({', '.join(notes)})" if notes else "")

    @property
    def compares_sample(self) -> bool:
        return self.sampled or self.s > FULL_COMPARISON_MAX_S


def _table(rows: tuple[int, int, int], odd: tuple[int, int, int], loss: tuple[int, int, int]) -> list[Case]:
    """Every dtype on the uniform grid at `rows` shapes, the arbitrary grid, non-contiguous x
    and odd shapes at `odd`, the smallest problem, a long grid, and the loss in every dtype, on
    groups of rows and on blockwise directions."""
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
        Case("loss", BF16, *odd, groups=3),
        Case("loss", FP32, *odd, directions="blockwise"),
        Case("loss", BF16, *odd, groups=2, directions="blockwise"),
    ]


SMALL_CASES = _table((300, 96, 257), (37, 24, 19), (256, 64, 128)) + [
    Case("sums", BF16, 67, 5, 33, t=129, label="longest grid of the CPU kernel"),
    Case("loss", FP32, 64, 48, 4133, directions="blockwise", label="two blocks"),
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
    Case("loss", BF16, 1024, 256, 12289, groups=2, directions="blockwise", label="blockwise, 4 blocks"),
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
