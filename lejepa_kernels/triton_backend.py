"""The Triton backend: the fused CUDA kernels of `kernels/` (forward and backward).

They take fp32, bf16 and fp16 CUDA tensors, on any grid (a uniform one runs the trig recurrence,
any other direct trig), and also run on CPU tensors in Triton's interpreter (`TRITON_INTERPRET=1`
set before triton is imported). triton is imported at the first call, not with the package.

The kernels take one group ([N, D]): a call of one group ([1, N, D]) runs them on x[0]; grouped
input (G > 1) runs on the PyTorch path for now (`unsupported` says so).
"""

from __future__ import annotations

import importlib.util
import os

import torch

NAME = "triton"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable() -> str | None:
    """Why the kernels cannot run on this machine (triton is not installed), or None."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    return None


def unsupported(x: torch.Tensor, n_points: int, dt: float, groups: int = 1) -> str | None:
    """Why the kernels do not take this call, or None: they take fp32, bf16 and fp16 CUDA
    tensors (CPU tensors in Triton's interpreter), on any grid, of one group."""
    if x.dtype not in KERNEL_DTYPES:
        return f"it takes fp32, bf16 or fp16, got {x.dtype} (fp64 runs on the PyTorch backend)"
    if x.device.type != "cuda" and not interpreting():
        return (
            f"it needs CUDA tensors (got {x.device}); set TRITON_INTERPRET=1 before importing "
            "triton to run the kernels on the CPU"
        )
    if groups > 1:
        return "grouped input (G > 1) runs on the PyTorch path for now"
    return None


def ecf_sums(
    x: torch.Tensor, A: torch.Tensor, t: torch.Tensor, dt: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos_sums, sin_sums) [1, S, T] fp32 from x [1, N, D], A [D, S] and t [T]:
    `kernels.ecf_forward` on x[0]."""
    from .kernels import ecf_forward

    _check_one_group(x)
    cos_sums, sin_sums = ecf_forward(x[0], A, t, dt)
    return cos_sums.unsqueeze(0), sin_sums.unsqueeze(0)


def ecf_sums_backward(
    x: torch.Tensor,
    A: torch.Tensor,
    t: torch.Tensor,
    grad_cos: torch.Tensor,
    grad_sin: torch.Tensor,
    dt: float,
) -> torch.Tensor:
    """dx [1, N, D] in x's dtype from the [1, S, T] gradients of the sums: `kernels.ecf_backward`
    on x[0]."""
    from .kernels import ecf_backward

    _check_one_group(x)
    return ecf_backward(x[0], A, t, grad_cos[0], grad_sin[0], dt).unsqueeze(0)


def _check_one_group(x: torch.Tensor) -> None:
    if x.dim() != 3 or x.shape[0] != 1:
        raise ValueError(f"the Triton kernels take x of shape [1, N, D], got {tuple(x.shape)}")
