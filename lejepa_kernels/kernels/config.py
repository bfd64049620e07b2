"""Launch settings shared by the kernels: block configurations, dtype rules, device checks."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel (block sizes are powers of 2, >= 16)."""

    block_n: int
    block_s: int
    block_d: int
    num_warps: int
    num_stages: int


# Chosen from ptxas register counts for sm_80 and sm_90 (tests/test_compile_targets.py): none of
# these spills, for either grid. Deeper software pipelining of the D loop (num_stages=3) spilled
# in every variant tried, and so did 64x64 backward tiles with fp16 inputs (fp32 dP stores).
_FORWARD = KernelConfig(block_n=64, block_s=64, block_d=32, num_warps=8, num_stages=1)
FORWARD_CONFIGS = {torch.float32: _FORWARD, torch.bfloat16: _FORWARD, torch.float16: _FORWARD}
BACKWARD_CONFIGS = {
    torch.float32: KernelConfig(block_n=32, block_s=64, block_d=32, num_warps=4, num_stages=2),
    torch.bfloat16: KernelConfig(block_n=64, block_s=64, block_d=32, num_warps=4, num_stages=2),
    torch.float16: KernelConfig(block_n=32, block_s=32, block_d=32, num_warps=4, num_stages=2),
}


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreter_bf16(x: torch.Tensor) -> bool:
    """True when bf16 tiles must be multiplied in fp32 (the interpreter; see projection_tile)."""
    return interpreting() and x.dtype == torch.bfloat16


def kernel_directions(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A as the kernels read it: fp32, rounded to bf16 first where the kernel cannot round it."""
    return A.to(torch.bfloat16).float() if interpreter_bf16(x) else A


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: fp32 inputs use 3xTF32 (about fp32-accurate, on tensor cores)."""
    return "tf32x3" if dtype == torch.float32 else "ieee"


def launch_device_check(x: torch.Tensor, *others: torch.Tensor) -> None:
    """Raise unless x (fp32/bf16/fp16) and the others can be handed to a Triton kernel."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"the Triton kernels take fp32, bf16 or fp16 inputs, got {x.dtype}; "
            "use backend='torch' for fp64"
        )
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {x.device}); set TRITON_INTERPRET=1 "
            "before importing triton to run the kernels on the CPU, or use backend='torch'"
        )
    for other in others:
        if other.device != x.device:
            raise ValueError(f"all inputs must be on {x.device}, got one on {other.device}")


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def program_count_target(device: torch.device) -> int:
    """About how many programs fill the device: 4 per SM on CUDA, 1 in the interpreter."""
    if device.type != "cuda":
        return 1
    return 4 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
