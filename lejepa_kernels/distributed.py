"""The collectives of SIGReg under torch.distributed: one all-reduce of the ECF sums per step,
and a broadcast of the step counter when a module first runs (or is reloaded).

Both use `torch.distributed._functional_collectives`, which runs eagerly and traces under
`torch.compile(fullgraph=True)` (`torch.distributed.nn.functional.all_reduce` raises there), and
whose all-reduce is differentiable: its backward all-reduces (sums) the gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


def is_distributed() -> bool:
    """True when torch.distributed is initialised (checked at call time)."""
    return dist.is_available() and dist.is_initialized()


def check_group(group: Optional[dist.ProcessGroup]) -> None:
    """Raise TypeError unless group is None (the world) or a torch.distributed ProcessGroup."""
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(
            "process_group must be None (the world) or a torch.distributed ProcessGroup, "
            f"got {type(group).__name__}"
        )


def _resolve(group: Optional[dist.ProcessGroup]) -> dist.ProcessGroup:
    return dist.group.WORLD if group is None else group


def all_reduce_sums(
    cos_sums: torch.Tensor,
    sin_sums: torch.Tensor,
    n_rows: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum the (*, S, T) cos/sin sums and the (*) row counts (one per group of rows) over the
    process group's ranks in one all-reduce.

    The three are packed into one buffer of 2*G*S*T + G values of the sums' dtype (fp32; fp64
    for fp64 embeddings; G the number of groups, 1 for 2-D embeddings). The all-reduce is
    differentiable: its backward sums the gradient over the ranks, so rank r gets W times the
    gradient of its own rows (W = the group's size). Returns (cos_sums, sin_sums, n_rows),
    summed, of the same shapes.
    """
    packed = torch.cat([cos_sums.flatten(), sin_sums.flatten(), n_rows.flatten()])
    packed = funcol.wait_tensor(funcol.all_reduce(packed, "sum", _resolve(group)))
    size = cos_sums.numel()
    return (
        packed[:size].view_as(cos_sums),
        packed[size : 2 * size].view_as(sin_sums),
        packed[2 * size :].view_as(n_rows),
    )


def group_size(group: Optional[dist.ProcessGroup] = None) -> int:
    """The number of ranks in the process group (None: the world)."""
    return dist.get_world_size(_resolve(group))


def broadcast_from_first_rank(
    tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None
) -> torch.Tensor:
    """The value of `tensor` on the group's rank 0, as a new tensor on every rank of the group.

    The tensor must be on a device the group's backend serves (NCCL: CUDA; gloo: CPU or CUDA).
    """
    return funcol.wait_tensor(funcol.broadcast(tensor, 0, _resolve(group)))


def group_name(group: Optional[dist.ProcessGroup] = None) -> str:
    """The name of the group (None: the world), by which a custom op's body finds it again."""
    return _resolve(group).group_name


def all_reduce_in_op(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """The sum of `tensor` over the ranks of the group named `name`, as a new tensor: for the
    bodies of custom ops (`blockwise.py`), which run eagerly and take the group by its name."""
    return funcol.wait_tensor(funcol.all_reduce(tensor, "sum", name))
