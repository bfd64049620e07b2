"""Drop-ins for the official LeJEPA package's `EppsPulley` and `SlicingUnivariateTest`.

Same arguments, buffers, state_dict keys, input shapes and reductions as
`lejepa.univariate.epps_pulley.EppsPulley` and `lejepa.multivariate.slicing.SlicingUnivariateTest`
(github.com/rbalestr-lab/lejepa), and the same numbers for the same step: the directions are the
official ones (`torch.randn(D, num_slices)` from a generator on x's device seeded with
`global_step`, each column divided by its L2 norm: the seed's `random_directions`), and the
statistic is N sum_k w_k |phi_hat(t_k) - phi(t_k)|^2 on the same trapezoid grid. The sliced
module never materialises [N, S, T]: it runs `FusedSlicedEppsPulley`'s path.

    # from lejepa.univariate import EppsPulley; from lejepa.multivariate import SlicingUnivariateTest
    from lejepa_kernels.compat.lejepa import EppsPulley, SlicingUnivariateTest

    sigreg = SlicingUnivariateTest(EppsPulley(t_max=3, n_points=17), num_slices=1024)
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..functional import check_grid, reduce_statistic, sliced_epps_pulley_on_directions
from ..modules import OnGrid, SlicedStatistics
from ..reference import quadrature

__all__ = ["EppsPulley", "SlicingUnivariateTest"]

INTEGRATIONS = ("trapezoid",)
SAMPLERS = ("gaussian",)
REDUCTIONS = ("mean", "sum", None)


class EppsPulley(OnGrid):
    """The official `EppsPulley` univariate test: buffers `t` (linspace(0, t_max, n_points)),
    `phi` (exp(-t^2 / 2)) and `weights` (trapezoid weights folded onto [0, t_max], times phi),
    fp32 [n_points] each; attributes `integration` and `n_points`.

    Called on projections x (*, N, K) (any float dtype) it returns their statistics (*, K),
    fp32 (fp64 for fp64 x), through the fused ECF sums on the identity directions (a K x K
    matmul); `SlicingUnivariateTest` uses only its grid and never calls it.

    :param t_max: upper end of the grid.
    :param n_points: number of grid points (odd, >= 3).
    :param integration: "trapezoid", the only rule the official code computes.
    """

    def __init__(self, t_max: float = 3, n_points: int = 17, integration: str = "trapezoid"):
        super().__init__()
        check_grid(t_max, n_points)
        if integration not in INTEGRATIONS:
            raise ValueError(f"integration must be one of {INTEGRATIONS}, got {integration!r}")
        self.integration = integration
        self.n_points = n_points
        self._hold_grid(*quadrature(t_max, n_points))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (*, N, K) projections. Returns the per-slice statistics (*, K)."""
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError("x must be a tensor of projections of shape (*, N, K)")
        identity = torch.eye(x.shape[-1], dtype=torch.float32, device=x.device)
        return sliced_epps_pulley_on_directions(
            x, identity, self.t, self.phi, self.weights, dt=self._grid_spacing(), reduction="none"
        )

    def extra_repr(self) -> str:
        return f"n_points={self.n_points}, integration={self.integration!r}"


class SlicingUnivariateTest(SlicedStatistics):
    """The official `SlicingUnivariateTest` with an `EppsPulley`: x (*, N, D) projected on
    `num_slices` random unit directions, each slice's Epps-Pulley statistic, then reduced.

    Buffers (state_dict keys): `global_step` and the univariate test's `univariate_test.t`,
    `univariate_test.phi`, `univariate_test.weights`. Each call draws the directions of
    `global_step` (on x's device) and advances it by one. x: fp32, bf16, fp16 or fp64; returns
    fp32 (fp64 for fp64 x): 0-d for "mean" and "sum", the statistics (*, num_slices) for None.
    Under torch.distributed the statistic is that of the batch concatenated over the ranks (one
    all-reduce of the ECF sums; see `FusedSlicedEppsPulley`).

    :param univariate_test: an `EppsPulley` of this module (the one test with a fused path).
    :param num_slices: number of random directions.
    :param reduction: "mean", "sum" or None (the statistics, (*, num_slices)).
    :param sampler: "gaussian", the only sampler the official code has.
    :param clip_value: statistics below it are set to 0 (their gradient too); None: no clipping.
    :param backend, process_group, distributed: as for `FusedSlicedEppsPulley` (keyword only).
    """

    def __init__(
        self,
        univariate_test: EppsPulley,
        num_slices: int,
        reduction: Optional[str] = "mean",
        sampler: str = "gaussian",
        clip_value: Optional[float] = None,
        *,
        backend: str = "auto",
        process_group: Optional[dist.ProcessGroup] = None,
        distributed: bool = True,
    ):
        if not isinstance(univariate_test, EppsPulley):
            kind = f"{type(univariate_test).__module__}.{type(univariate_test).__qualname__}"
            raise TypeError(
                "univariate_test must be lejepa_kernels.compat.lejepa.EppsPulley, the one univariate "
                f"test with a fused path, got {kind}; use the official SlicingUnivariateTest for other tests"
            )
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if clip_value is not None and (isinstance(clip_value, bool) or not isinstance(clip_value, numbers.Real)):
            raise TypeError(f"clip_value must be a number or None, got {clip_value!r}")
        super().__init__(num_slices, backend=backend, process_group=process_group, distributed=distributed)
        self.reduction = reduction
        self.sampler = sampler
        self.univariate_test = univariate_test
        self.clip_value = clip_value
        self._resync_grid()

    @property
    def grid(self) -> nn.Module:
        return self.univariate_test

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (*, N, D) samples. Returns the reduced statistic (0-d) or (*, num_slices)."""
        stats = self._statistics(x, "none", False)
        if self.clip_value is not None:
            stats = stats.masked_fill(stats < self.clip_value, 0)
        return reduce_statistic(stats, "none" if self.reduction is None else self.reduction)

    def extra_repr(self) -> str:
        return (
            f"num_slices={self.num_slices}, reduction={self.reduction!r}, sampler={self.sampler!r}, "
            f"clip_value={self.clip_value}, backend={self.backend!r}"
        )
