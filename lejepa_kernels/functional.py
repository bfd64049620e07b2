"""The functional API: SIGReg from embeddings, whichever backend computes the ECF sums."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from . import ops
from .backends import choose
from .blockwise import DirectionSpec, orthonormal_groups, sliced_epps_pulley_blockwise
from .distributed import all_reduce_sums, check_group, group_size, is_distributed
from .reference import quadrature
from .statistic import epps_pulley_statistic, reduce_statistic

REDUCTIONS = ("mean", "sum", "none")
"""How the (*, S) statistics become the result: their mean (the seed's loss), sum, or themselves."""


def check_num_slices(num_slices: int, name: str = "num_slices") -> None:
    """Raise ValueError unless num_slices is an integer >= 1 (`name`: the argument's name)."""
    if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {num_slices!r}")


def check_config(num_slices: int, t_max: float, n_points: int) -> None:
    """Raise ValueError unless num_slices >= 1, 0 < t_max < inf and n_points is odd and >= 3."""
    check_num_slices(num_slices)
    check_grid(t_max, n_points)


def check_grid(t_max: float, n_points: int) -> None:
    """Raise ValueError unless 0 < t_max < inf (in fp32) and n_points is odd and >= 3."""
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


def check_loss_options(reduction: str, unbiased: bool) -> None:
    """Raise ValueError unless reduction is one of REDUCTIONS, TypeError unless unbiased is a bool."""
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(unbiased, bool):
        raise TypeError(f"unbiased must be a bool, got {unbiased!r}")


def check_embeddings(x: torch.Tensor, min_rows: int = 2) -> None:
    """Raise TypeError/ValueError unless x is a floating (*, N, D) tensor (each leading index a
    group of N rows; at least one group), N >= min_rows, D >= 1.

    A rank whose sums are all-reduced may hold a single row (the row count is then global).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [N, D] or (*, N, D), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must have a floating dtype (fp32, bf16, fp16, fp64), got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(
            f"x must be [N, D] (rows x features) or (*, N, D) (groups of rows), got shape {tuple(x.shape)}"
        )
    if x.shape[-1] < 1:
        raise ValueError(f"x must have at least one feature column, got shape {tuple(x.shape)}")
    if x.shape[-2] < min_rows:
        rows = "1 row" if min_rows == 1 else f"{min_rows} rows"
        per_group = " per group" if x.dim() > 2 else ""
        raise ValueError(f"x must have at least {rows}{per_group}, got shape {tuple(x.shape)}")
    if 0 in x.shape[:-2]:
        raise ValueError(f"x must hold at least one group of rows, got shape {tuple(x.shape)}")


def ecf_sums(
    x: torch.Tensor,
    A: torch.Tensor,
    t: torch.Tensor,
    backend: str = "auto",
    *,
    dt: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over rows of cos and sin of t_k (x @ A), differentiable in x (A and t take none).

    x: [N, D] float, or (*, N, D): each leading index is a group of N rows with its own sums,
    all computed in one pass; A: [D, S]; t: [T]. Returns (cos_sums, sin_sums), [S, T] each for
    2-D x, (*, S, T) for grouped x; fp32 (fp64 for fp64 x). dt > 0 promises t_k = k * dt (the
    CPU and Triton kernels then replace the trig calls by a recurrence); the default 0 makes no
    promise. `backend`: "auto" or a name of the backend table (see `backends.choose`).
    """
    check_embeddings(x, min_rows=1)
    for name, tensor in (("A", A), ("t", t)):
        if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
            got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"{name} must be a tensor of a floating dtype, got {got}")
    if A.dim() != 2 or A.shape[0] != x.shape[-1]:
        raise ValueError(f"A must be [D, S] with D = x.shape[-1] = {x.shape[-1]}, got {tuple(A.shape)}")
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
    groups = x.reshape(-1, *x.shape[-2:])  # [G, N, D]: a view of x where its strides allow
    backend = choose(backend, x, t.numel(), dt)
    cos_sums, sin_sums = ops.ecf_sums(groups, A, t, backend, float(dt))
    shape = x.shape[:-2] + cos_sums.shape[1:]
    return cos_sums.view(shape), sin_sums.view(shape)


def _min_rows(reduce: bool, unbiased: bool, process_group: Optional[dist.ProcessGroup]) -> int:
    """The fewest rows per group a call may hold: 2 in one process; 1 when the ranks' rows are
    summed, except that the unbiased form on a group of one rank still needs 2."""
    if not reduce:
        return 2
    return 2 if unbiased and group_size(process_group) < 2 else 1


def sliced_epps_pulley_on_directions(
    x: torch.Tensor,
    A: torch.Tensor,
    t: torch.Tensor,
    phi: torch.Tensor,
    weights: torch.Tensor,
    backend: str = "auto",
    dt: float = 0.0,
    *,
    process_group: Optional[dist.ProcessGroup] = None,
    distributed: bool = True,
    reduction: str = "mean",
    unbiased: bool = False,
) -> torch.Tensor:
    """SIGReg of x [N, D] or (*, N, D) (groups) on given directions A [D, S] (no gradient) and
    a given quadrature grid (t, phi, weights: [T]), the same directions for every group.

    When torch.distributed is initialised and `distributed` is true, each group's sums and row
    count are summed over the ranks of `process_group` (None: the world) in one all-reduce, so
    the loss is that of the concatenated batch. Returns the `reduction` of the (*, S)
    statistics: 0-d, or (*, S) for "none"; fp32 (fp64 for fp64 x).
    """
    reduce = distributed and is_distributed()
    check_embeddings(x, min_rows=_min_rows(reduce, unbiased, process_group))
    cos_sums, sin_sums = ecf_sums(x, A, t.to(x.device), backend, dt=dt)
    n = cos_sums.new_full(x.shape[:-2], x.shape[-2])
    if reduce:
        cos_sums, sin_sums, n = all_reduce_sums(cos_sums, sin_sums, n, process_group)
    statistic = epps_pulley_statistic(
        cos_sums, sin_sums, n, phi.to(cos_sums), weights.to(cos_sums), unbiased
    )
    return reduce_statistic(statistic, reduction)


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
    reduction: str = "mean",
    unbiased: bool = False,
    directions: DirectionSpec = DirectionSpec(),
) -> torch.Tensor:
    """`sliced_epps_pulley_on_directions` on the directions drawn for the 0-d integer tensor
    `step` as `directions` says: the seed's (by default, drawn on x's device) or blockwise
    (`blockwise.py`: it does its own all-reduces, one per block)."""
    reduce = distributed and is_distributed()
    check_embeddings(x, min_rows=_min_rows(reduce, unbiased, process_group))
    if directions.kind == "blockwise":
        groups = x.reshape(-1, *x.shape[-2:])  # [G, N, D]: a view of x where its strides allow
        backend = choose(backend, x, t.numel(), dt)
        result = sliced_epps_pulley_blockwise(
            groups, step, num_slices, t, phi, weights, backend, dt, directions, process_group, reduce,
            reduction, unbiased,
        )
        return result.view(*x.shape[:-2], num_slices) if reduction == "none" else result
    A = ops.directions(step, x.shape[-1], num_slices, x.device)
    if directions.orthogonal:
        A = orthonormal_groups(A)
    return sliced_epps_pulley_on_directions(
        x,
        A,
        t,
        phi,
        weights,
        backend,
        dt,
        process_group=process_group,
        distributed=distributed,
        reduction=reduction,
        unbiased=unbiased,
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
    reduction: str = "mean",
    unbiased: bool = False,
    directions: str = "seed",
    orthogonal: bool = False,
    block_size: Optional[int] = None,
    seed: int = 0,
) -> torch.Tensor:
    """SIGReg loss: the seed's `SlicedEppsPulley` at `step`, without materialising [N, S, T].

    x: [N, D] embeddings, fp32/bf16/fp16/fp64, or (*, N, D): each leading index is a group
    (a view, say) with its own statistic, all on the step's directions and computed in one pass.
    A non-finite value in x makes the loss (and the gradient) NaN; it raises nothing.

    reduction: "mean" (default: the mean over groups and slices; the seed's loss for 2-D x),
    "sum", or "none" (the statistics, (*, S); [S] for 2-D x). unbiased: use the unbiased
    estimate of |phi_hat|^2 (see `epps_pulley_statistic`): the statistic's expectation is then
    N times the weighted distance between the characteristic functions, 0 under the null, with
    no O(1) term from the sampling noise; needs N >= 2 rows per group in all. Returns fp32
    (fp64 for fp64 x).

    Under torch.distributed the loss is that of the batch concatenated over the ranks of
    `process_group` (None: the world), and rank r's gradient is W times that of its rows; pass
    the same `step` on every rank. `distributed=False` gives each rank the loss of its own rows.

    `directions`: "seed" (the seed's [D, S] matrix for the step) or "blockwise" (blocks of
    `block_size` slices drawn when used, keyed by (seed, step, block): memory independent of
    num_slices, but for the (*, S) result of "none"). `orthogonal`: orthonormalise each group of
    at most D directions.
    """
    spec = DirectionSpec(directions, orthogonal, block_size, seed)
    check_config(num_slices, t_max, n_points)
    check_group(process_group)
    check_loss_options(reduction, unbiased)
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
        reduction=reduction,
        unbiased=unbiased,
        directions=spec,
    )
