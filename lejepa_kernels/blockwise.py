"""Blockwise directions: SIGReg at any slice count, in memory independent of it.

`directions="blockwise"` never draws the [D, S] directions of a call whole. The S slices are cut
into blocks of at most `block_size`; block b's directions A_b [D, B] are drawn when and where the
block is used, from a generator on the embeddings' device seeded with `block_key(seed, step, b)`.
The op takes x [G, N, D], G groups of rows each with its own statistics, all on the same
directions. Per block: A_b, its ECF sums [G, B, T] (the chosen backend's `ecf_sums`), its [G, B]
statistics (plug-in or unbiased, `statistic.py`), added into the loss ("mean", "sum") or written
into the [G, S] result ("none"). The backward recomputes each block (A_b again, its sums, then the
backend's `ecf_sums_backward` with the block's gradient coefficients). Extra memory:
O(G*N*D + B*D + G*B*T), whatever S is, plus the [G, S] result and its gradient for "none"
(docs/DESIGN.md, section 7).

The generator is torch's own (Philox on CUDA, counter-based; mt19937 on the CPU, seeded per block
with the low 32 bits of the key, which differ between the blocks of a call). A hash generator in
torch integer ops would give the same numbers on every device, but measured at 4-10x the time of
`torch.randn` per value on the CPU. The directions are therefore a pure function of (seed, step,
block_size, orthogonal) for a device type (CPU or CUDA) and torch version: identical on every rank
and in the forward and the backward, with no broadcast; not the seed's numbers.

Under torch.distributed each block's sums and the row count are all-reduced before its
statistic: the loss is the exact statistic of the concatenated batch, at S/B collectives per
forward and S/B + 1 per backward (the backward recomputes the global sums, and sums the incoming
gradient over the ranks as an all-reduce's backward does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from . import torch_backend
from .backends import TABLE
from .distributed import all_reduce_in_op, group_name
from .statistic import ecf_distance

__all__ = [
    "DEFAULT_BLOCK_SIZE", "DIRECTIONS", "DirectionSpec", "block_key", "block_directions",
    "blockwise_directions", "orthonormal_groups", "sliced_epps_pulley_blockwise",
]

DIRECTIONS = ("seed", "blockwise")
"""`directions=` choices: the seed's [D, S] matrix for the step, or blocks drawn as used."""
DEFAULT_BLOCK_SIZE = 4096
"""Slices per block of "blockwise": 8 MiB of directions at D = 512."""
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class DirectionSpec:
    """How a call draws its directions.

    kind: "seed" (the seed's `random_directions(D, S, step)`) or "blockwise";
    orthogonal: orthonormalise each consecutive group of at most D directions (of each block);
    block_size: slices per block ("blockwise" only; None: DEFAULT_BLOCK_SIZE);
    seed: the generator's key besides the step ("blockwise" only; the seed's directions are keyed
    by the step alone).
    """

    kind: str = "seed"
    orthogonal: bool = False
    block_size: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in DIRECTIONS:
            raise ValueError(f"directions must be one of {DIRECTIONS}, got {self.kind!r}")
        if not isinstance(self.orthogonal, bool):
            raise TypeError(f"orthogonal must be a bool, got {type(self.orthogonal).__name__}")
        if self.block_size is not None and (
            isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1
        ):
            raise ValueError(f"block_size must be an integer >= 1 (or None), got {self.block_size!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if self.kind == "seed" and (self.block_size is not None or self.seed != 0):
            raise ValueError(
                "block_size and seed apply to directions='blockwise'; the seed's directions are drawn "
                "whole from the step"
            )
        if self.kind == "blockwise" and self.block_size is None:
            object.__setattr__(self, "block_size", DEFAULT_BLOCK_SIZE)


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers that scatters every input bit."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def block_key(seed: int, step: int, block: int) -> int:
    """The generator seed of block `block` at (seed, step): a 64-bit hash of (seed, step) plus the
    block index, mod 2^64, so the blocks of one call never share a key (nor its low 32 bits)."""
    return (_mix64(_mix64(seed & _MASK64) ^ (step & _MASK64)) + block) & _MASK64


def orthonormal_groups(G: torch.Tensor) -> torch.Tensor:
    """G [D, W] float with each consecutive group of at most D columns replaced by Q of its QR,
    signs corrected so that diag(R) >= 0 (Q is then a deterministic function of the group and,
    for Gaussian G, Haar-distributed). Returns a new [D, W] tensor of G's dtype."""
    dim, width = G.shape
    out = torch.empty_like(G)
    full = width // dim * dim
    for start, stop, batch in ((0, full, width // dim), (full, width, 1)):
        if stop == start:
            continue
        groups = G[:, start:stop].reshape(dim, batch, -1).transpose(0, 1)  # [batch, D, <= D]
        Q, R = torch.linalg.qr(groups)
        signs = torch.where(R.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(Q.dtype)
        out[:, start:stop] = (Q * signs.unsqueeze(-2)).transpose(0, 1).reshape(dim, stop - start)
    return out


def block_directions(
    dim: int, width: int, key: int, orthogonal: bool, device: torch.device | str
) -> torch.Tensor:
    """One block's directions [dim, width] fp32 on `device`: Gaussian columns from a generator on
    `device` seeded with `key`, divided by their norms (or orthonormalised in groups of dim).

    They are drawn as the rows of a contiguous [width, dim] tensor and returned as its transposed
    view (the backends take any layout): the norms are then contiguous reductions, on this CPU
    4x faster than over the columns of [dim, width], and no transposing copy is made."""
    generator = torch.Generator(device=device).manual_seed(key)
    G = torch.randn(width, dim, device=device, generator=generator)
    if orthogonal:
        return orthonormal_groups(G.T)
    return G.div_(torch.linalg.vector_norm(G, dim=1, keepdim=True)).T


def _blocks(num_slices: int, block_size: int) -> Iterator[tuple[int, int]]:
    """(block index, width) of the blocks covering num_slices, each of at most block_size."""
    for index, start in enumerate(range(0, num_slices, block_size)):
        yield index, min(block_size, num_slices - start)


def blockwise_directions(
    dim: int,
    num_slices: int,
    step: int,
    *,
    seed: int = 0,
    block_size: int = DEFAULT_BLOCK_SIZE,
    orthogonal: bool = False,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """All the blockwise directions of a call, [dim, num_slices] fp32: for oracles and tests (the
    loss never forms this matrix)."""
    return torch.cat([
        block_directions(dim, width, block_key(seed, step, index), orthogonal, device)
        for index, width in _blocks(num_slices, block_size)
    ], dim=1)


def _block_sums(x, t, key, width, orthogonal, backend, dt, group):
    """(A_b, cos_sums, sin_sums, n): a block's directions [D, B], the [G, B, T] sums of x
    [G, N, D] and the row counts [G], summed over the ranks of `group` (a process-group name;
    "" for none)."""
    A = block_directions(x.shape[-1], width, key, orthogonal, x.device)
    cos_sums, sin_sums = TABLE[backend].ecf_sums(x, A, t, dt)
    n = cos_sums.new_full(x.shape[:1], x.shape[1])
    if group:
        packed = all_reduce_in_op(torch.cat([cos_sums.flatten(), sin_sums.flatten(), n]), group)
        size = cos_sums.numel()
        cos_sums, sin_sums = packed[:size].view_as(cos_sums), packed[size : 2 * size].view_as(sin_sums)
        n = packed[2 * size :]
    return A, cos_sums, sin_sums, n


@torch.library.custom_op("lejepa_kernels::blockwise_sliced_epps_pulley", mutates_args=())
def _loss(
    x: torch.Tensor,
    step: torch.Tensor,
    t: torch.Tensor,
    phi: torch.Tensor,
    weights: torch.Tensor,
    num_slices: int,
    block_size: int,
    orthogonal: bool,
    seed: int,
    backend: str,
    dt: float,
    group: str,
    reduction: str,
    unbiased: bool,
) -> torch.Tensor:
    """The `reduction` of the [G, S] Epps-Pulley statistics of x [G, N, D], accumulated block by
    block: 0-d ("mean" over groups and slices, "sum") or [G, S] ("none"); fp32 (fp64 for fp64 x)."""
    dtype = torch_backend.compute_dtype(x)
    t, phi, weights = t.to(dtype), phi.to(dtype), weights.to(dtype)
    step_value = int(step)
    if reduction == "none":
        statistics = torch.empty(x.shape[0], num_slices, dtype=dtype, device=x.device)
    total = torch.zeros((), dtype=dtype, device=x.device)
    for index, width in _blocks(num_slices, block_size):
        key = block_key(seed, step_value, index)
        _, cos_sums, sin_sums, n = _block_sums(x, t, key, width, orthogonal, backend, dt, group)
        distance = ecf_distance(cos_sums, sin_sums, n, phi, weights, unbiased)  # [G, B]
        if reduction == "none":
            start = index * block_size
            statistics[:, start : start + width] = distance * n[:, None]  # as epps_pulley_statistic
        else:
            total += (distance.sum(1) * n).sum()
    if reduction == "none":
        return statistics
    return total / (x.shape[0] * num_slices) if reduction == "mean" else total


@_loss.register_fake
def _(x, step, t, phi, weights, num_slices, block_size, orthogonal, seed, backend, dt, group, reduction, unbiased):
    shape = (x.shape[0], num_slices) if reduction == "none" else ()
    return x.new_empty(shape, dtype=torch_backend.compute_dtype(x))


@torch.library.custom_op("lejepa_kernels::blockwise_sliced_epps_pulley_backward", mutates_args=())
def _loss_backward(
    x: torch.Tensor,
    step: torch.Tensor,
    t: torch.Tensor,
    phi: torch.Tensor,
    weights: torch.Tensor,
    grad: torch.Tensor,
    num_slices: int,
    block_size: int,
    orthogonal: bool,
    seed: int,
    backend: str,
    dt: float,
    group: str,
    reduction: str,
    unbiased: bool,
) -> torch.Tensor:
    """dx [G, N, D] in x's dtype, from grad (0-d; [G, S] for "none"): per block, the directions
    and global sums again, then the backend's `ecf_sums_backward` with the statistic's derivatives
    grad_cos = 2 c w (r cm - phi), grad_sin = 2 c w r sm (cm, sm: the sums over n; r = n / (n - 1)
    if unbiased else 1; c: grad's coefficient of the block's statistics, grad / (G S) for "mean")."""
    dtype = torch_backend.compute_dtype(x)
    t, phi, weights = t.to(dtype), phi.to(dtype), weights.to(dtype)
    grad = grad.to(dtype)
    if group:
        grad = all_reduce_in_op(grad.reshape(-1), group).view_as(grad)
    if reduction == "mean":
        grad = grad / (x.shape[0] * num_slices)
    step_value = int(step)
    grad_x = torch.zeros(x.shape, dtype=dtype, device=x.device)
    for index, width in _blocks(num_slices, block_size):
        key = block_key(seed, step_value, index)
        A, cos_sums, sin_sums, n = _block_sums(x, t, key, width, orthogonal, backend, dt, group)
        if reduction == "none":
            start = index * block_size
            scaled_weights = weights * (2 * grad[:, start : start + width, None])  # [G, B, T]
        else:
            scaled_weights = weights * (2 * grad)
        n = n[:, None, None]
        cos_mean, sin_mean = cos_sums / n, sin_sums / n
        if unbiased:
            gain = n / (n - 1)
            cos_mean, sin_mean = cos_mean * gain, sin_mean * gain
        grad_cos = (cos_mean - phi) * scaled_weights
        grad_sin = sin_mean * scaled_weights
        grad_x += TABLE[backend].ecf_sums_backward(x, A, t, grad_cos, grad_sin, dt)
    return grad_x.to(x.dtype)


@_loss_backward.register_fake
def _(x, step, t, phi, weights, grad, num_slices, block_size, orthogonal, seed, backend, dt, group, reduction,
      unbiased):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, step, t, phi, weights, *config = inputs
    ctx.save_for_backward(x, step, t, phi, weights)
    ctx.config = config


def _backward(ctx, grad: torch.Tensor):
    x, step, t, phi, weights = ctx.saved_tensors
    grad_x = _loss_backward(x, step, t, phi, weights, grad, *ctx.config)
    return (grad_x,) + (None,) * 13


_loss.register_autograd(_backward, setup_context=_setup_context)


def sliced_epps_pulley_blockwise(
    x: torch.Tensor,
    step: torch.Tensor,
    num_slices: int,
    t: torch.Tensor,
    phi: torch.Tensor,
    weights: torch.Tensor,
    backend: str,
    dt: float,
    spec: DirectionSpec,
    process_group: Optional[dist.ProcessGroup] = None,
    reduce: bool = False,
    reduction: str = "mean",
    unbiased: bool = False,
) -> torch.Tensor:
    """SIGReg of x [G, N, D] (G groups of N rows, each with its own statistics) with blockwise
    directions, as one `lejepa_kernels` op (its backward a second one): the `reduction` ("mean"
    over groups and slices, "sum", "none") of the [G, S] statistics (`unbiased`: see
    `statistic.epps_pulley_statistic`), 0-d or [G, S]; fp32 (fp64 for fp64 x).

    step: 0-d integer tensor (on the CPU, for no device sync); t, phi, weights: [T] the grid;
    backend: a name of the backend table, as `backends.choose` decided; reduce: all-reduce each
    block's sums and the row counts over `process_group` (None: the world).
    """
    if spec.kind != "blockwise":
        raise ValueError(f"sliced_epps_pulley_blockwise draws blockwise directions, got {spec.kind!r}")
    if x.dim() != 3:
        raise ValueError(f"sliced_epps_pulley_blockwise takes x [G, N, D], got shape {tuple(x.shape)}")
    # A copy: the module advances its step in place after the call, and the backward reads it.
    step = step.detach().clone()
    device = x.device
    return _loss(
        x, step, t.to(device), phi.to(device), weights.to(device), num_slices, spec.block_size,
        spec.orthogonal, spec.seed, backend, float(dt), group_name(process_group) if reduce else "",
        reduction, unbiased,
    )
