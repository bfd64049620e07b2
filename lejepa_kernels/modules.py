"""nn.Modules: the seed's `EppsPulley`/`SlicedEppsPulley` and the drop-in `FusedSlicedEppsPulley`."""

from __future__ import annotations

import torch
from torch import nn

from .functional import BACKEND_CHOICES, check_config, sliced_epps_pulley_on_grid
from .reference import EppsPulley, SlicedEppsPulley

__all__ = ["EppsPulley", "SlicedEppsPulley", "FusedSlicedEppsPulley"]


class FusedSlicedEppsPulley(nn.Module):
    """Drop-in for the seed's `SlicedEppsPulley`: same arguments, buffers, state_dict, numbers.

    Calling it on embeddings x [N, D] (fp32, bf16, fp16 or fp64) returns the scalar SIGReg loss
    (fp32; fp64 for fp64 x) and advances `global_step` by one, as the seed does, but never
    materialises the [N, S, T] tensors. State dicts load both ways with `SlicedEppsPulley`.

    :param num_slices: number of random 1-D projections.
    :param t_max: upper end of the integration grid.
    :param n_points: number of grid points (odd, >= 3).
    :param backend: "auto" (Triton for CUDA tensors when available, PyTorch otherwise; the
        environment variable LEJEPA_KERNELS_BACKEND overrides it), "torch" or "triton".
    """

    def __init__(
        self, num_slices: int = 1024, t_max: float = 3.0, n_points: int = 17, *, backend: str = "auto"
    ):
        super().__init__()
        check_config(num_slices, t_max, n_points)
        if backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
        self.num_slices = num_slices
        self.backend = backend
        self.uniform_step = t_max / (n_points - 1)
        self.ep = EppsPulley(t_max=t_max, n_points=n_points)
        self.register_buffer("global_step", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, D] embeddings. Returns the scalar loss."""
        loss = sliced_epps_pulley_on_grid(
            x,
            self.global_step,
            self.num_slices,
            self.ep.t,
            self.ep.phi,
            self.ep.weights,
            self.backend,
            self.uniform_step,
        )
        with torch.no_grad():
            self.global_step.add_(1)
        return loss

    def extra_repr(self) -> str:
        return f"num_slices={self.num_slices}, n_points={self.ep.t.numel()}, backend={self.backend!r}"
