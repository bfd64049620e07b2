"""`FusedSlicedEppsPulley`: the drop-in for the seed's `SlicedEppsPulley` (in `reference.py`)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .backends import check_choice
from .blockwise import DirectionSpec
from .distributed import broadcast_from_first_rank, check_group, is_distributed
from .functional import (
    check_config,
    check_embeddings,
    sliced_epps_pulley_on_grid,
    uniform_spacing,
)
from .reference import EppsPulley

__all__ = ["FusedSlicedEppsPulley"]


def step_is_on_host(step: torch.Tensor) -> bool:
    """Whether reading the step tensor costs no device synchronisation."""
    return step.device.type == "cpu"


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
    :param process_group: under torch.distributed, the ranks whose embeddings form the batch
        (None: the world).
    :param distributed: False computes each rank's SIGReg on its own rows (no communication),
        for ablations; True (default) sums over the process group when torch.distributed is
        initialised at call time.
    :param directions: "seed" (default: the seed's [D, S] directions for the step, its numbers)
        or "blockwise" (blocks of `block_size` slices drawn when used, keyed by (seed, step,
        block): memory independent of num_slices; see `lejepa_kernels.blockwise`).
    :param orthogonal: orthonormalise each group of at most D directions.
    :param block_size: slices per block of "blockwise" (None: 4096).
    :param seed: key of the blockwise generator besides the step.

    Under torch.distributed the loss on every rank is that of the concatenated batch (one
    all-reduce of the cos/sin sums and row count per call), and rank r's gradient is W times
    that of its rows, so that DDP's gradient averaging gives the full-batch gradient. Every rank
    must draw the same directions: the first call under torch.distributed (and the first after
    `load_state_dict` or `resync_step`) broadcasts `global_step` from the group's rank 0; after
    that every call advances it by one on every rank, with no further communication.

    The grid is the `ep.t`, `ep.phi` and `ep.weights` buffers, as in the seed: after
    `load_state_dict` the loaded grid is used, whatever the constructor's arguments were.

    The directions are drawn from a host-side copy of `global_step`, so a call on a GPU never
    waits for the device to read the step. The copy follows the module's own updates and
    `load_state_dict`; after editing `global_step` in place by hand, call `resync_step()`.
    """

    def __init__(
        self,
        num_slices: int = 1024,
        t_max: float = 3.0,
        n_points: int = 17,
        *,
        backend: str = "auto",
        process_group: Optional[dist.ProcessGroup] = None,
        distributed: bool = True,
        directions: str = "seed",
        orthogonal: bool = False,
        block_size: Optional[int] = None,
        seed: int = 0,
    ):
        super().__init__()
        self.direction_spec = DirectionSpec(directions, orthogonal, block_size, seed)
        check_config(num_slices, t_max, n_points)
        check_choice(backend)
        check_group(process_group)
        if not isinstance(distributed, bool):
            raise TypeError(f"distributed must be a bool, got {type(distributed).__name__}")
        self.num_slices = num_slices
        self.backend = backend
        self.process_group = process_group
        self.distributed = distributed
        self.ep = EppsPulley(t_max=t_max, n_points=n_points)
        self.register_buffer("global_step", torch.zeros((), dtype=torch.long))
        self._host_step = torch.zeros((), dtype=torch.long)
        self._step_broadcast = False
        self._resync_grid()
        self.register_load_state_dict_post_hook(FusedSlicedEppsPulley._after_load)

    def _after_load(self, incompatible_keys) -> None:
        self.resync_step()
        self._resync_grid()

    def _resync_grid(self) -> None:
        """Read the grid spacing off `ep.t` (waits for the device once): the kernels' trig
        recurrence for a uniform grid from 0, direct trig for any other."""
        self.dt = uniform_spacing(self.ep.t)
        self._grid_version = self.ep.t._version

    def _grid_spacing(self) -> float:
        """`dt` for `ep.t` as it is now: eager calls notice an in-place edit of the
        grid (its version counter moves); compiled ones rely on `load_state_dict`."""
        if not torch.compiler.is_compiling() and self.ep.t._version != self._grid_version:
            self._resync_grid()
        return self.dt

    def resync_step(self) -> None:
        """Copy `global_step` to its host-side copy (waits for the device once); the next call
        under torch.distributed broadcasts it from rank 0 again."""
        with torch.no_grad():
            self._host_step.copy_(self.global_step)
        self._step_broadcast = False

    def _broadcast_step(self, device: torch.device) -> None:
        """Set `global_step` and its host copy to rank 0's step (one collective, one sync).

        The step travels on the embeddings' device, which the group's backend serves."""
        with torch.no_grad():
            step = broadcast_from_first_rank(self.global_step.to(device), self.process_group)
            self.global_step.copy_(step)
            self._host_step.copy_(step)
        self._step_broadcast = True

    def _sampling_step(self) -> torch.Tensor:
        """The step as a CPU tensor: the buffer itself when it lives on the CPU, else the copy."""
        if step_is_on_host(self.global_step):
            with torch.no_grad():
                self._host_step.copy_(self.global_step)
            return self.global_step
        return self._host_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, D] embeddings. Returns the scalar loss."""
        if self.distributed and not self._step_broadcast and is_distributed():
            check_embeddings(x, min_rows=1)
            self._broadcast_step(x.device)
        step = self._sampling_step()
        loss = sliced_epps_pulley_on_grid(
            x,
            step,
            self.num_slices,
            self.ep.t,
            self.ep.phi,
            self.ep.weights,
            self.backend,
            self._grid_spacing(),
            process_group=self.process_group,
            distributed=self.distributed,
            directions=self.direction_spec,
        )
        with torch.no_grad():
            self.global_step.add_(1)
            self._host_step.add_(1)
        return loss

    def extra_repr(self) -> str:
        return (
            f"num_slices={self.num_slices}, n_points={self.ep.t.numel()}, "
            f"backend={self.backend!r}, distributed={self.distributed}, "
            f"directions={self.direction_spec}"
        )
