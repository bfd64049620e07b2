"""The functional API: SIGReg from embeddings, whichever backend computes the ECF sums."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from . import ops
from .backends import choose
from .blockwise import DirectionSpec, orthonormal_groups, sliced_epps_pulley_blockwise
from .distributed import all_reduce_sums, check_group, is_distributed
from .reference import quadrature


def check_config(num_slices: int, t_max: float, n_points: int) -> None:
    """Raise ValueError unless num_slices >= 1, 0 < t_max < inf and n_points is odd and >= 3."""
    if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
        raise ValueError(f"num_slices must be an integer >= 1, got {num_slices!r}")
    if not (
        isinstance(t_max, (int, float))
        and not isinstance(t_max, bool)
        and 0 < t_max <= torch.finfo(torch.float32).max
    ):
        raise ValueError(f"t_max must be a number > 0 that fp32 can hold (finite), got {t_max!r}")
    if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 3:
        raise ValueError(f"n_points must be an odd integer >= 3, got {n_points!r}")
    if n_points % 2 == 0:
        raise ValueError(f"n_points must be odd, got {n_points}")


def uniform_spacing(t: torch.Tensor) -> float:
    """dt when the grid t [T] is t_k = k * dt (dt > 0, up to fp32 rounding), else 0.0.

    Reads t on the host (a device sync when t lives on a GPU)."""
    grid = t.detach().to("cpu", torch.float64)
    if grid.numel() < 2 or grid[0] != 0 or not bool(grid.isfinite().all()):
        return 0.0
    dt = grid[-1].item() / (grid.numel() - 1)
    uniform = torch.arange(grid.numel(), dtype=torch.float64) * dt
    tolerance = 8 * torch.finfo(torch.float32).eps * abs(grid[-1].item())
    return dt if dt > 0 and (grid - uniform).abs().max().item() <= tolerance else 0.0


def check_embeddings(x: torch.Tensor, min_rows: int = 2) -> None:
    """Raise TypeError/ValueError unless x is a floating [N, D] tensor, N >= min_rows, D >= 1.

    A rank whose sums are all-reduced may hold a single row (the row count is then global).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [N, D], got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must have a floating dtype (fp32, bf16, fp16, fp64), got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [N, D] (rows x features), got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"x must have at least one feature column, got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        rows = "1 row" if min_rows == 1 else f"{min_rows} rows"
        raise ValueError(f"x must have at least {rows}, got shape {tuple(x.shape)}")


def ecf_sums(
    x: torch.Tensor,
    A: torch.Tensor,
    t: torch.Tensor,
    backend: str = "auto",
    *,
    dt: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over rows of cos and sin of t_k (x @ A), differentiable in x (A and t take none).

    x: [N, D] float; A: [D, S]; t: [T]. Returns (cos_sums, sin_sums), [S, T] each, fp32 (fp64
    for fp64 x). dt > 0 promises t_k = k * dt (the CPU and Triton kernels
    then replace the trig calls by a recurrence); the default 0 makes no promise. `backend`:
    "auto" or a name of the backend table (see `backends.choose`).
    """
    check_embeddings(x, min_rows=1)
    for name, tensor in (("A", A), ("t", t)):
        if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
            got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"{name} must be a tensor of a floating dtype, got {got}")
    if A.dim() != 2 or A.shape[0] != x.shape[1]:
        raise ValueError(f"A must be [D, S] with D = x.shape[1] = {x.shape[1]}, got {tuple(A.shape)}")
    if A.shape[1] < 1:
        raise ValueError(f"A must have at least one column (slice), got shape {tuple(A.shape)}")
    if t.dim() != 1:
        raise ValueError(f"t must be 1-D [T], got shape {tuple(t.shape)}")
    if t.numel() < 1:
        raise ValueError("t must hold at least one point, got an empty grid")
    if isinstance(dt, bool) or not isinstance(dt, (int, float)):
        raise TypeError(f"dt must be a number, got {type(dt).__name__}")
    if not (math.isfinite(dt) and dt >= 0):
        raise ValueError(f"dt must be finite and >= 0 (0: any grid), got {dt}")
    if A.requires_grad or t.requires_grad:
        raise ValueError("ecf_sums gives no gradient for A or t; detach them")
    if not (x.device == A.device == t.device):
        raise ValueError(f"x, A and t must be on one device, got {x.device}, {A.device}, {t.device}")
    backend = choose(backend, x, t.numel(), dt)
    return ops.ecf_sums(x, A, t, backend, float(dt))


def epps_pulley_from_sums(
    cos_sums: torch.Tensor,
    sin_sums: torch.Tensor,
    n_rows: torch.Tensor,
    phi: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Mean over slices of the Epps-Pulley statistic, from [S, T] ECF sums over n_rows rows."""
    err = (cos_sums / n_rows - phi).square() + (sin_sums / n_rows).square()
    return ((err @ weights) * n_rows).mean()


def sliced_epps_pulley_on_grid(
    x: torch.Tensor,
    step: torch.Tensor,
    num_slices: int,
    t: torch.Tensor,
    phi: torch.Tensor,
    weights: torch.Tensor,
    backend: str = "auto",
    dt: float = 0.0,
    *,
    process_group: Optional[dist.ProcessGroup] = None,
    distributed: bool = True,
    directions: DirectionSpec = DirectionSpec(),
) -> torch.Tensor:
    """SIGReg of x [N, D] on a given quadrature grid (t, phi, weights: [T] each).

    The directions are drawn for the 0-d integer tensor `step` as `directions` says: the seed's
    (by default) or blockwise (`blockwise.py`, which also does the all-reduces per block). When torch.distributed is
    initialised and `distributed` is true, the sums and row count are summed over the ranks of
    `process_group` (None: the world) in one all-reduce, so the loss is that of the concatenated
    batch. Returns a 0-d tensor, fp32 (fp64 for fp64 x).
    """
    reduce = distributed and is_distributed()
    check_embeddings(x, min_rows=1 if reduce else 2)
    if directions.kind == "blockwise":
        backend = choose(backend, x, t.numel(), dt)
        return sliced_epps_pulley_blockwise(
            x, step, num_slices, t, phi, weights, backend, dt, directions, process_group, reduce
        )
    A = ops.directions(step, x.shape[1], num_slices, x.device)
    if directions.orthogonal:
        A = orthonormal_groups(A)
    cos_sums, sin_sums = ecf_sums(x, A, t.to(x.device), backend, dt=dt)
    n = cos_sums.new_full((), x.shape[0])
    if reduce:
        cos_sums, sin_sums, n = all_reduce_sums(cos_sums, sin_sums, n, process_group)
    return epps_pulley_from_sums(
        cos_sums, sin_sums, n, phi.to(cos_sums), weights.to(cos_sums)
    )


def _step_tensor(step: int | torch.Tensor) -> torch.Tensor:
    """The training step as a 0-d integer tensor; refuses floats, strings and bools."""
    if isinstance(step, torch.Tensor):
        if step.dim() != 0 or step.dtype == torch.bool or step.is_floating_point() or step.is_complex():
            raise TypeError(f"step must be an int or a 0-d integer tensor, got {step.dtype} of shape "
                            f"{tuple(step.shape)}")
        return step
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int or a 0-d integer tensor, got {step!r}")
    return torch.tensor(step)


def sliced_epps_pulley(
    x: torch.Tensor,
    step: int | torch.Tensor,
    num_slices: int = 1024,
    t_max: float = 3.0,
    n_points: int = 17,
    backend: str = "auto",
    *,
    process_group: Optional[dist.ProcessGroup] = None,
    distributed: bool = True,
    directions: str = "seed",
    orthogonal: bool = False,
    block_size: Optional[int] = None,
    seed: int = 0,
) -> torch.Tensor:
    """SIGReg loss: the seed's `SlicedEppsPulley` at `step`, without materialising [N, S, T].

    x: [N, D] embeddings, fp32/bf16/fp16/fp64. A non-finite value in x makes the loss (and the
    gradient) NaN; it raises nothing. Returns a 0-d tensor, fp32 (fp64 for fp64 x).

    Under torch.distributed the loss is that of the batch concatenated over the ranks of
    `process_group` (None: the world), and rank r's gradient is W times that of its rows; pass
    the same `step` on every rank. `distributed=False` gives each rank the loss of its own rows.

    `directions`: "seed" (the seed's [D, S] matrix for the step) or "blockwise" (blocks of
    `block_size` slices drawn when used, keyed by (seed, step, block): memory independent of
    num_slices). `orthogonal`: orthonormalise each group of at most D directions.
    """
    spec = DirectionSpec(directions, orthogonal, block_size, seed)
    check_config(num_slices, t_max, n_points)
    check_group(process_group)
    step = _step_tensor(step)
    t, phi, weights = quadrature(t_max, n_points)
    dt = t_max / (n_points - 1)
    return sliced_epps_pulley_on_grid(
        x,
        step,
        num_slices,
        t,
        phi,
        weights,
        backend,
        dt,
        process_group=process_group,
        distributed=distributed,
        directions=spec,
    )
