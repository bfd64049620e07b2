"""Drop-in for lightly's `SIGReg` (lightly/loss/lejepa_loss.py in github.com/lightly-ai/lightly).

Same arguments, buffers (`t`, `phi`, `weights`; no step counter), input (..., N, C) and
numbers: for the same global random state it draws lightly's directions
(`torch.randn(C, num_vectors)` in x's dtype on x's device from the global generator, each column
divided by its L2 norm in that dtype) and returns the mean over groups and directions of
N sum_k w_k |phi_hat(t_k) - phi(t_k)|^2, computed by the fused ECF sums without materialising
[N, S, T].

    # from lightly.loss import SIGReg
    from lejepa_kernels.compat.lightly import SIGReg
"""

from __future__ import annotations

import numbers

import torch

from ..backends import check_choice
from ..distributed import broadcast_from_first_rank, group_size, is_distributed
from ..functional import check_embeddings, check_num_slices, sliced_epps_pulley_on_directions
from ..modules import OnGrid

__all__ = ["SIGReg"]


def lightly_grid(knots: int, t_max: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lightly's grid, fp32 [knots] each: t = linspace(0, t_max, knots), phi = exp(-t^2 / 2),
    and the trapezoid weights over [-t_max, t_max] folded onto [0, t_max], times phi."""
    t = torch.linspace(0, t_max, knots, dtype=torch.float32)
    dt = t_max / (knots - 1)
    weights = torch.full((knots,), 2 * dt, dtype=torch.float32)
    weights[[0, -1]] = dt
    phi = torch.exp(-t.square() / 2.0)
    return t, phi, weights * phi


class SIGReg(OnGrid):
    """lightly's SIGReg loss on x (..., N, C): fp32, bf16, fp16 or fp64; returns 0-d fp32
    (fp64 for fp64 x).

    :param knots: number of grid points (>= 2; even counts are allowed, as in lightly).
    :param t_max: upper end of the grid (> 0).
    :param num_vectors: number of random unit directions (slices).
    :param gather_distributed: under torch.distributed with more than one rank, rank 0's
        directions are broadcast and the statistic is that of the batch concatenated over the
        ranks: the ECF sums and row counts are all-reduced in one call, and rank r's gradient is
        W times that of its rows, as with lightly's autograd-aware all-reduce.
    :param backend: "auto", "torch", "cpu" or "triton" (keyword only; see `FusedSlicedEppsPulley`).
    """

    def __init__(
        self,
        knots: int = 17,
        t_max: float = 3.0,
        num_vectors: int = 1024,
        gather_distributed: bool = False,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        if isinstance(knots, bool) or not isinstance(knots, int) or knots < 2:
            raise ValueError(f"knots must be an integer >= 2, got {knots!r}")
        if isinstance(t_max, bool) or not isinstance(t_max, numbers.Real) or not 0 < t_max < float("inf"):
            raise ValueError(f"t_max must be a finite number > 0, got {t_max!r}")
        check_num_slices(num_vectors, "num_vectors")
        if not isinstance(gather_distributed, bool):
            raise TypeError(f"gather_distributed must be a bool, got {type(gather_distributed).__name__}")
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError("gather_distributed is True but torch.distributed is not available")
        check_choice(backend)
        self.num_vectors = num_vectors
        self.gather_distributed = gather_distributed
        self.backend = backend
        self._hold_grid(*lightly_grid(knots, t_max))

    def _gathering(self) -> bool:
        return self.gather_distributed and is_distributed() and group_size() > 1

    def forward(self, proj: torch.Tensor) -> torch.Tensor:
        """proj: (..., N, C) embeddings. Returns the scalar loss."""
        gathering = self._gathering()
        check_embeddings(proj, min_rows=1 if gathering else 2)
        with torch.no_grad():
            A = torch.randn(proj.shape[-1], self.num_vectors, device=proj.device, dtype=proj.dtype)
            if gathering:
                A = broadcast_from_first_rank(A)
            A = A / A.norm(p=2, dim=0)
        return sliced_epps_pulley_on_directions(
            proj,
            A,
            self.t,
            self.phi,
            self.weights,
            self.backend,
            self._grid_spacing(),
            distributed=gathering,
        )

    def extra_repr(self) -> str:
        return (
            f"knots={self.t.numel()}, num_vectors={self.num_vectors}, "
            f"gather_distributed={self.gather_distributed}, backend={self.backend!r}"
        )
