"""Launch settings shared by the kernels: block configurations, dtype rules, operand checks and
the scope every launch runs in."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton

from ..triton_backend import KERNEL_DTYPES, interpreting, unsupported

INDEX_LIMIT = 2**31
"""Rows, features and slices are indexed in int32 inside the kernels (addresses are 64-bit)."""


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel (block sizes are powers of 2, >= 16)."""

    block_n: int
    block_s: int
    block_d: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        # tl.arange takes power-of-2 lengths and tl.dot a K of at least 16 for 16-bit operands
        # (the kernels static_assert both); rows and slices keep to the same >= 16, the range the
        # ptxas checks cover. Triton itself asserts a power-of-2 num_warps, with a bare assert.
        for name in ("block_n", "block_s", "block_d"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of 2 and >= 16, got {size}")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"KernelConfig.num_warps must be a power of 2, got {self.num_warps}")


# The configurations `tuning` chooses from, per kernel and dtype; the first is the default
# (the interpreter, and wherever tuning is off). The 16-bit defaults are the fastest measured on
# an H200 (benchmarks/results/2026-11-28-nvidia-h200-torch2.11-triton3.6-kernels-after.txt).
# With 4 warps on a 64 x 64 tile sm_90's wgmma layout splits only the slices axis over warps
# (warpsPerCTA [4, 1]), so the forward's row sums stay inside a warp (7 bar.sync in its PTX, in
# the D loop); sm_80's mma splits it [2, 2] (77 bar.sync). Each list holds the configuration
# from before tuning existed, so no GPU can be slower. fp32 tiles reach tl.dot as
# 3xTF32 (each operand split in two), hence narrower D steps. Every default compiles without
# register spills for sm_80 and sm_90 under Triton 3.6 and 3.8 (tests/test_compile_targets.py,
# with every bf16 candidate; benchmarks/kernel_report.py compiles every candidate of every case).
# One candidate spills there: fp32's 4-warp forward, 104 bytes on sm_90 under Triton 3.6 on
# shapes that are not multiples of 16; it runs only where tuning measured it faster (2.9 against
# 5.2 ms for the 8-warp one at 8192 x 512 x 8192 on the H200).
_FORWARD_16BIT = (
    KernelConfig(block_n=64, block_s=64, block_d=32, num_warps=4, num_stages=3),
    KernelConfig(block_n=64, block_s=64, block_d=32, num_warps=4, num_stages=2),
    KernelConfig(block_n=64, block_s=64, block_d=32, num_warps=8, num_stages=1),
)
FORWARD_CANDIDATES = {
    torch.float32: (
        KernelConfig(block_n=64, block_s=64, block_d=16, num_warps=8, num_stages=1),
        KernelConfig(block_n=64, block_s=64, block_d=16, num_warps=4, num_stages=2),
    ),
    torch.bfloat16: _FORWARD_16BIT,
    torch.float16: _FORWARD_16BIT,
}
LONG_GRID_FORWARD_CANDIDATES = {
    torch.float32: (KernelConfig(block_n=64, block_s=64, block_d=16, num_warps=8, num_stages=1),),
    torch.bfloat16: (_FORWARD_16BIT[-1],),
    torch.float16: (_FORWARD_16BIT[-1],),
}
"""The forward on grids of more than SINGLE_CHUNK_POINTS points, whose chunk starts take a
direct sincos per projection: the 4-warp tiles spill there (up to 180 bytes on sm_80 under
Triton 3.6), the 8-warp ones do not."""
BACKWARD_CANDIDATES = {
    torch.float32: (
        KernelConfig(block_n=32, block_s=64, block_d=32, num_warps=4, num_stages=3),
        KernelConfig(block_n=32, block_s=64, block_d=32, num_warps=4, num_stages=2),
    ),
    torch.bfloat16: (
        KernelConfig(block_n=64, block_s=64, block_d=64, num_warps=4, num_stages=3),
        KernelConfig(block_n=32, block_s=64, block_d=32, num_warps=4, num_stages=3),
        KernelConfig(block_n=64, block_s=64, block_d=32, num_warps=8, num_stages=2),
    ),
    torch.float16: (
        KernelConfig(block_n=64, block_s=64, block_d=64, num_warps=4, num_stages=3),
        KernelConfig(block_n=32, block_s=64, block_d=32, num_warps=4, num_stages=3),
        KernelConfig(block_n=32, block_s=32, block_d=32, num_warps=4, num_stages=2),
    ),
}
SINGLE_CHUNK_POINTS = 32
"""Grids of up to this many points are walked in one chunk (the recurrence never restarts)."""
CHUNK_POINTS = 16
"""Longer grids are cut into chunks of at most this many points: the recurrence restarts from
direct trig at each chunk, so its error stays that of a few rotations whatever the length."""


def grid_chunk(n_points: int) -> int:
    """Grid points per chunk: the whole grid up to SINGLE_CHUNK_POINTS points, else the fewest
    chunks of at most CHUNK_POINTS, of equal length (the last may be shorter): 17 -> 17,
    65 -> 13, 129 -> 15."""
    if n_points <= SINGLE_CHUNK_POINTS:
        return n_points
    return triton.cdiv(n_points, triton.cdiv(n_points, CHUNK_POINTS))


def interpreter_bf16(x: torch.Tensor) -> bool:
    """True when bf16 tiles must be multiplied in fp32 (the interpreter; see _projection_tile)."""
    return interpreting() and x.dtype == torch.bfloat16


def kernel_directions(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [D, S] as the kernels read it, rounded once per call: in x's dtype (fp32 holding
    bf16-rounded values where the interpreter cannot multiply bf16; see _projection_tile)."""
    if interpreter_bf16(x):
        return A.to(torch.bfloat16).float()
    return A.to(x.dtype)


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: fp32 inputs use 3xTF32 (about fp32-accurate, on tensor cores)."""
    return "tf32x3" if dtype == torch.float32 else "ieee"


def launch_device_check(x: torch.Tensor, *others: torch.Tensor) -> None:
    """Raise unless x and the others can be handed to a Triton kernel: TypeError for a dtype,
    ValueError for a device (the reasons are `triton_backend.unsupported`'s)."""
    reason = unsupported(x, 0, 0.0)
    if reason:
        error = TypeError if x.dtype not in KERNEL_DTYPES else ValueError
        raise error(f"the Triton kernels cannot take this call: {reason}; use backend='torch'")
    for other in others:
        if other.device != x.device:
            raise ValueError(f"all inputs must be on {x.device}, got one on {other.device}")


def kernel_operands(
    x: torch.Tensor, A: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, A, t) in the layouts the kernels read, after checking dtypes, devices and shapes.

    x: [N, D] or [G, N, D] (G groups of N rows) fp32/bf16/fp16, returned as [G, N, D] (G = 1
    for 2-D input), any group and row strides, copied only if its features are not contiguous;
    A: [D, S] and t: [T], returned contiguous fp32 (copies only where they are not).
    """
    launch_device_check(x, A, t)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [N, D] or [G, N, D], got shape {tuple(x.shape)}")
    if A.dim() != 2 or A.shape[0] != x.shape[-1]:
        raise ValueError(f"A must be [D, S] with D = x.shape[-1] = {x.shape[-1]}, got {tuple(A.shape)}")
    if t.dim() != 1:
        raise ValueError(f"t must be 1-D [T], got shape {tuple(t.shape)}")
    x = x if x.dim() == 3 else x.unsqueeze(0)
    G, N, D = x.shape
    sizes = (("rows G * N", G * N), ("features D", D), ("slices S", A.shape[1]))
    for name, size in sizes:
        if size >= INDEX_LIMIT:
            raise ValueError(
                f"the Triton kernels take fewer than 2^31 {name}, got {size}; use backend='torch'"
            )
    if x.stride(2) != 1 and D > 1:
        x = x.contiguous()
    return x, A.to(torch.float32).contiguous(), t.to(torch.float32).contiguous()


@contextlib.contextmanager
def launch_scope(device: torch.device) -> Iterator[None]:
    """The scope of a kernel launch for tensors on `device`: that GPU made current (a launch
    goes to the current device, not to its tensors'), and in the interpreter of Triton < 3.8,
    scalar-to-index conversion that numpy >= 2.4 accepts (`range` over a runtime bound)."""
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(torch.cuda.device(device))
        if interpreting() and _triton_version() < (3, 8):
            stack.enter_context(_interpreter_scalar_index())
        yield


def _triton_version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


@contextlib.contextmanager
def _interpreter_scalar_index() -> Iterator[None]:
    """Triton's interpreter holds a kernel's scalars as one-element arrays; before 3.8 it turns
    them into Python ints with int(array), which numpy 2.4 refuses for arrays of one dimension.
    Within this scope each interpreted launch converts them as Triton 3.8 does."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_with_scalar_index(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_tensor_with_scalar_index
    try:
        yield
    finally:
        interpreter._patch_lang_tensor = patch_tensor


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


PROGRAMS_PER_SM = 8
"""The forward splits rows until about this many programs per SM (measured on an H200 at the
paper workload: 2, 4, 8, 16 per SM gave 1.27, 1.13, 0.98, 0.95 ms); more splits cost only a
small [2, T, S] partial sum each."""


def program_count_target(device: torch.device) -> int:
    """About how many programs fill the device: PROGRAMS_PER_SM per SM on CUDA, 1 in the
    interpreter."""
    if device.type != "cuda":
        return 1
    return PROGRAMS_PER_SM * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
