"""The Triton backend: the fused CUDA kernels of `kernels/` (forward and backward).

They take fp32, bf16 and fp16 CUDA tensors, on any grid (a uniform one runs the trig recurrence,
any other direct trig), and also run on CPU tensors in Triton's interpreter (`TRITON_INTERPRET=1`
set before triton is imported). triton is imported at the first call, not with the package.
Grouped input [G, N, D] runs in one launch for all groups (one per chunk of slices backward).
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


def unsupported(x: torch.Tensor, n_points: int, dt: float) -> str | None:
    """Why the kernels do not take this call, or None: they take fp32, bf16 and fp16 CUDA
    tensors (CPU tensors in Triton's interpreter), on any grid, in any number of groups."""
    if x.dtype not in KERNEL_DTYPES:
        return f"it takes fp32, bf16 or fp16, got {x.dtype} (fp64 runs on the PyTorch backend)"
    if x.device.type != "cuda" and not interpreting():
        return (
            f"it needs CUDA tensors (got {x.device}); set TRITON_INTERPRET=1 before importing "
            "triton to run the kernels on the CPU"
        )
    return None


def ecf_sums(
    x: torch.Tensor, A: torch.Tensor, t: torch.Tensor, dt: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos_sums, sin_sums) [G, S, T] fp32 from x [G, N, D], A [D, S] and t [T]:
    `kernels.ecf_forward`, every group in one launch."""
    from .kernels import ecf_forward

    return ecf_forward(x, A, t, dt)


def ecf_sums_backward(
    x: torch.Tensor,
    A: torch.Tensor,
    t: torch.Tensor,
    grad_cos: torch.Tensor,
    grad_sin: torch.Tensor,
    dt: float,
) -> torch.Tensor:
    """dx [G, N, D] in x's dtype from the [G, S, T] gradients of the sums:
    `kernels.ecf_backward`, every group in one launch per chunk of slices."""
    from .kernels import ecf_backward

    return ecf_backward(x, A, t, grad_cos, grad_sin, dt)
