"""Seed-faithful SIGReg: the oracle every other path is tested against.

`EppsPulley` and `SlicedEppsPulley` reproduce stable-pretraining's modules number for number in
one process (same arguments, buffers, state_dict keys and random directions). They materialise
[N, S, T] tensors, exactly as the seed does, so use them for checking, not for training.

Under torch.distributed they follow the package's contract (docs/DESIGN.md, section 4), not the
seed's discarded all_reduce: the cos/sin sums and the row count are summed over ranks, so the
statistic is that of the concatenated batch, and autograd gives rank r W times its rows' gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce


def quadrature(t_max: float, n_points: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The seed's integration grid, as fp32 CPU tensors of shape [n_points].

    Returns (t, phi, weights): t = linspace(0, t_max, n_points), phi = exp(-t^2/2) and the
    trapezoid weights over [-t_max, t_max] folded onto [0, t_max], times phi.
    """
    t = torch.linspace(0, t_max, n_points)
    dt = t_max / (n_points - 1)
    phi = (-0.5 * t**2).exp()
    weights = torch.full((n_points,), 2 * dt)
    weights[[0, -1]] = dt
    return t, phi, weights * phi


def random_directions(
    dim: int, num_slices: int, step: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The seed's unit directions for a step: [dim, num_slices] fp32 on `device`.

    Drawn by `torch.randn` from a generator on `device` seeded with `step`, each column then
    divided by its L2 norm, so every process (and every rank) draws the same matrix.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    generator = torch.Generator(device=device).manual_seed(int(step))
    A = torch.randn(dim, num_slices, device=device, generator=generator)
    return A / A.norm(p=2, dim=0)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class EppsPulley(nn.Module):
    """Epps-Pulley statistic of each column of x [N, S] against the standard normal: [S]; of
    each group of x (*, N, S): (*, S), as the LeJEPA paper's code does.

    :param t_max: upper end of the integration grid.
    :param n_points: number of grid points (odd).
    """

    def __init__(self, t_max: float = 3.0, n_points: int = 17):
        super().__init__()
        if n_points % 2 != 1:
            raise ValueError(f"n_points must be odd, got {n_points}")
        t, phi, weights = quadrature(t_max, n_points)
        self.register_buffer("t", t)
        self.register_buffer("phi", phi)
        self.register_buffer("weights", weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, S] (or (*, N, S)) projections. Returns the per-slice statistic [S] ((*, S))."""
        x_t = x.unsqueeze(-1) * self.t
        cos_sum = x_t.cos().sum(-3)
        sin_sum = x_t.sin().sum(-3)
        n = torch.tensor(float(x.size(-2)), dtype=cos_sum.dtype, device=x.device)
        if _distributed():
            cos_sum = all_reduce(cos_sum)
            sin_sum = all_reduce(sin_sum)
            n = all_reduce(n)
        err = (cos_sum / n - self.phi).square() + (sin_sum / n).square()
        return (err @ self.weights.to(err.dtype)) * n


class SlicedEppsPulley(nn.Module):
    """Sliced Epps-Pulley test: mean Epps-Pulley statistic of x [N, D] over random directions
    (of x (*, N, D): the mean over groups and directions, the same directions for all).

    The directions for a call are `random_directions(D, num_slices, global_step)`; the
    `global_step` buffer then advances by one.

    :param num_slices: number of random 1-D projections.
    :param t_max: upper end of the integration grid.
    :param n_points: number of grid points (odd).
    """

    def __init__(self, num_slices: int = 1024, t_max: float = 3.0, n_points: int = 17):
        super().__init__()
        self.num_slices = num_slices
        self.ep = EppsPulley(t_max=t_max, n_points=n_points)
        self.register_buffer("global_step", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, D] (or (*, N, D)) embeddings. Returns the scalar loss."""
        with torch.no_grad():
            step = self.global_step.clone()
            if _distributed():
                dist.broadcast(step, src=0)
            A = random_directions(x.size(-1), self.num_slices, step.item(), x.device)
            self.global_step.add_(1)
        return self.ep(x @ A.to(x.dtype)).mean()
