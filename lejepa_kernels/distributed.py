"""The one collective of a SIGReg step: global cos/sin sums and row count over all ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_reduce


def is_distributed() -> bool:
    """True when torch.distributed is initialised (checked at call time)."""
    return dist.is_available() and dist.is_initialized()


def global_sums(
    cos_sums: torch.Tensor, sin_sums: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum [S, T] cos/sin sums and the row count over ranks in one all-reduce.

    Returns (cos_sums, sin_sums, n) with n a 0-d tensor of the sums' dtype. Outside
    torch.distributed nothing is communicated. The all-reduce is differentiable: its backward
    sums the gradient over ranks, so rank r gets W times the gradient of its own rows.
    """
    n = cos_sums.new_full((1,), float(n_rows))
    if not is_distributed():
        return cos_sums, sin_sums, n[0]
    packed = all_reduce(torch.cat([cos_sums.flatten(), sin_sums.flatten(), n]))
    size = cos_sums.numel()
    return (
        packed[:size].view_as(cos_sums),
        packed[size : 2 * size].view_as(sin_sums),
        packed[-1],
    )
