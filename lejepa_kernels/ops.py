"""The package's PyTorch operators (torch.library), so torch.compile sees each as one opaque node.

- `lejepa_kernels::directions(step, dim, num_slices, device)`: the seed's random unit directions
  for a step. Sampling inside an op keeps the generator (and reading the step) out of compiled
  graphs, and the directions are a fresh tensor of the forward, never an alias of the step.
- `lejepa_kernels::ecf_sums(x, A, t, backend, dt)`: the cos/sin sums over the rows of each
  group of x [G, N, D], [G, S, T] each, with a backward that recomputes the projections
  (`ecf_sums_backward`).

`backend` names the entry of the backend table (`backends.TABLE`) that computes the call, as
`backends.choose` decided it: "torch" (the memory-bounded PyTorch path), "cpu" (the native CPU
kernel) or "triton" (the fused kernels). `dt` > 0 declares t_k = k * dt,
which lets the kernels use the trig recurrence; 0 means an arbitrary grid.
"""

from __future__ import annotations

import torch

from . import torch_backend
from .backends import TABLE
from .reference import random_directions


@torch.library.custom_op("lejepa_kernels::directions", mutates_args=())
def directions(step: torch.Tensor, dim: int, num_slices: int, device: torch.device) -> torch.Tensor:
    """Unit directions [dim, num_slices] fp32 on `device` for the 0-d integer tensor `step`."""
    return random_directions(dim, num_slices, int(step), device)


@directions.register_fake
def _(step: torch.Tensor, dim: int, num_slices: int, device: torch.device) -> torch.Tensor:
    return torch.empty(dim, num_slices, dtype=torch.float32, device=device)


@torch.library.custom_op("lejepa_kernels::ecf_sums", mutates_args=())
def ecf_sums(
    x: torch.Tensor, A: torch.Tensor, t: torch.Tensor, backend: str, dt: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos_sums, sin_sums) [G, S, T] each: sums over each group's rows of cos and sin of
    t_k (x @ A), for x [G, N, D]; fp32, fp64 for fp64 x."""
    return TABLE[backend].ecf_sums(x, A, t, dt)


@ecf_sums.register_fake
def _(x: torch.Tensor, A: torch.Tensor, t: torch.Tensor, backend: str, dt: float):
    shape = (x.shape[0], A.shape[1], t.shape[0])
    dtype = torch_backend.compute_dtype(x)
    return x.new_empty(shape, dtype=dtype), x.new_empty(shape, dtype=dtype)


@torch.library.custom_op("lejepa_kernels::ecf_sums_backward", mutates_args=())
def ecf_sums_backward(
    x: torch.Tensor,
    A: torch.Tensor,
    t: torch.Tensor,
    grad_cos: torch.Tensor,
    grad_sin: torch.Tensor,
    backend: str,
    dt: float,
) -> torch.Tensor:
    """dx [G, N, D] in x's dtype, from the gradients [G, S, T] of the cos and sin sums."""
    return TABLE[backend].ecf_sums_backward(x, A, t, grad_cos, grad_sin, dt)


@ecf_sums_backward.register_fake
def _(x, A, t, grad_cos, grad_sin, backend, dt):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, A, t, backend, dt = inputs
    ctx.save_for_backward(x, A, t)
    ctx.backend = backend
    ctx.dt = dt


def _backward(ctx, grad_cos: torch.Tensor, grad_sin: torch.Tensor):
    x, A, t = ctx.saved_tensors
    grad_x = ecf_sums_backward(x, A, t, grad_cos, grad_sin, ctx.backend, ctx.dt)
    return grad_x, None, None, None, None


ecf_sums.register_autograd(_backward, setup_context=_setup_context)
