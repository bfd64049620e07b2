"""`FusedSlicedEppsPulley`, the drop-in for the seed's `SlicedEppsPulley` (in `reference.py`), and
the bases it shares with the compat modules: `OnGrid` (the grid buffers and their spacing) and
`SlicedStatistics` (the step counter that seeds the directions)."""

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
    check_loss_options,
    check_num_slices,
    sliced_epps_pulley_on_grid,
    uniform_spacing,
)
from .reference import EppsPulley

__all__ = ["FusedSlicedEppsPulley", "OnGrid", "SlicedStatistics"]


def step_is_on_host(step: torch.Tensor) -> bool:
    """Whether reading the step tensor costs no device synchronisation."""
    return step.device.type == "cpu"


def _after_load(module: OnGrid, incompatible_keys) -> None:
    module._on_load()


class OnGrid(nn.Module):
    """Base of the SIGReg modules: their quadrature grid is the `t`, `phi` and `weights` buffers
    ([T] each) of the submodule `grid` names, and the grid spacing `dt` the kernels use is read
    off `t` at construction (the subclass calls `_resync_grid` once `grid` exists), after
    `load_state_dict`, and in eager mode whenever `t` was edited in place."""

    def __init__(self) -> None:
        super().__init__()
        self.dt = 0.0
        self._grid_version = -1
        self.register_load_state_dict_post_hook(_after_load)

    @property
    def grid(self) -> nn.Module:
        """The module holding the buffers t, phi and weights: this one (`_hold_grid`), unless a
        subclass keeps them in a submodule."""
        return self

    def _hold_grid(self, t: torch.Tensor, phi: torch.Tensor, weights: torch.Tensor) -> None:
        """Register the grid ([T] each) as this module's buffers t, phi and weights, and read
        its spacing off t."""
        self.register_buffer("t", t)
        self.register_buffer("phi", phi)
        self.register_buffer("weights", weights)
        self._resync_grid()

    def _on_load(self) -> None:
        self._resync_grid()

    def _resync_grid(self) -> None:
        """Read the grid spacing off `t` (waits for the device once): the kernels' trig
        recurrence for a uniform grid from 0, direct trig for any other."""
        self.dt = uniform_spacing(self.grid.t)
        self._grid_version = self.grid.t._version

    def _grid_spacing(self) -> float:
        """`dt` for `t` as it is now: eager calls notice an in-place edit of the
        grid (its version counter moves); compiled ones rely on `load_state_dict`."""
        if not torch.compiler.is_compiling() and self.grid.t._version != self._grid_version:
            self._resync_grid()
        return self.dt


class SlicedStatistics(OnGrid):
    """Base of the modules whose directions are the seed's for their `global_step` buffer
    (drawn on the embeddings' device), which each call advances by one.

    The directions are drawn from a host-side copy of `global_step`, so a call on a GPU never
    waits for the device to read the step. The copy follows the module's own updates and
    `load_state_dict`; after editing `global_step` in place by hand, call `resync_step()`.
    Under torch.distributed (with `distributed` true) the first call, and the first after
    `load_state_dict` or `resync_step`, broadcasts `global_step` from the group's rank 0.
    """

    def __init__(
        self,
        num_slices: int,
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
        check_num_slices(num_slices)
        check_choice(backend)
        check_group(process_group)
        if not isinstance(distributed, bool):
            raise TypeError(f"distributed must be a bool, got {type(distributed).__name__}")
        self.num_slices = num_slices
        self.backend = backend
        self.process_group = process_group
        self.distributed = distributed
        self.register_buffer("global_step", torch.zeros((), dtype=torch.long))
        self._host_step = torch.zeros((), dtype=torch.long)
        self._step_broadcast = False

    def _on_load(self) -> None:
        self.resync_step()
        self._resync_grid()

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

    def _statistics(self, x: torch.Tensor, reduction: str, unbiased: bool) -> torch.Tensor:
        """The `reduction` of the (*, S) statistics of x (*, N, D) at this step; advances it."""
        if self.distributed and not self._step_broadcast and is_distributed():
            check_embeddings(x, min_rows=1)
            self._broadcast_step(x.device)
        step = self._sampling_step()
        grid = self.grid
        result = sliced_epps_pulley_on_grid(
            x,
            step,
            self.num_slices,
            grid.t,
            grid.phi,
            grid.weights,
            self.backend,
            self._grid_spacing(),
            process_group=self.process_group,
            distributed=self.distributed,
            reduction=reduction,
            unbiased=unbiased,
            directions=self.direction_spec,
        )
        with torch.no_grad():
            self.global_step.add_(1)
            self._host_step.add_(1)
        return result


class FusedSlicedEppsPulley(SlicedStatistics):
    """Drop-in for the seed's `SlicedEppsPulley`: same arguments, buffers, state_dict, numbers.

    Calling it on embeddings x [N, D] (fp32, bf16, fp16 or fp64) returns the scalar SIGReg loss
    (fp32; fp64 for fp64 x) and advances `global_step` by one, as the seed does, but never
    materialises the [N, S, T] tensors. State dicts load both ways with `SlicedEppsPulley`.
    On x of shape (*, N, D) each leading index is a group of rows (a view, say) with its own
    statistic, all on the call's directions, computed in one pass.

    :param num_slices: number of random 1-D projections.
    :param t_max: upper end of the integration grid.
    :param n_points: number of grid points (odd, >= 3).
    :param backend: "auto" (Triton for CUDA tensors when available, the native kernel for CPU
        ones, PyTorch otherwise; the environment variable LEJEPA_KERNELS_BACKEND overrides it),
        "torch", "cpu" or "triton".
    :param reduction: "mean" (the seed's loss: the mean over groups and slices), "sum", or
        "none" (the statistics, of shape (*, S)).
    :param unbiased: False (the seed's plug-in statistic) or True: |phi_hat|^2 replaced by its
        unbiased estimate, so the statistic's expectation is N times the weighted distance
        between the characteristic functions (0 under the null), without the plug-in's O(1)
        term from sampling noise; needs N >= 2 rows per group in all. See
        `functional.epps_pulley_statistic`.
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

    The step counter's machinery (`resync_step`, the host-side copy) is `SlicedStatistics`'s.
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
        reduction: str = "mean",
        unbiased: bool = False,
        directions: str = "seed",
        orthogonal: bool = False,
        block_size: Optional[int] = None,
        seed: int = 0,
    ):
        check_config(num_slices, t_max, n_points)
        check_loss_options(reduction, unbiased)
        super().__init__(
            num_slices, backend=backend, process_group=process_group, distributed=distributed,
            directions=directions, orthogonal=orthogonal, block_size=block_size, seed=seed,
        )
        self.reduction = reduction
        self.unbiased = unbiased
        self.ep = EppsPulley(t_max=t_max, n_points=n_points)
        self._resync_grid()

    @property
    def grid(self) -> nn.Module:
        return self.ep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, D] or (*, N, D) embeddings. Returns the loss (0-d), or the statistics (*, S)
        when reduction is "none"."""
        return self._statistics(x, self.reduction, self.unbiased)

    def extra_repr(self) -> str:
        return (
            f"num_slices={self.num_slices}, n_points={self.ep.t.numel()}, "
            f"backend={self.backend!r}, distributed={self.distributed}, "
            f"reduction={self.reduction!r}, unbiased={self.unbiased}, directions={self.direction_spec}"
        )
