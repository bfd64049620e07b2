"""Checkpoints of ``lejepa-kernels pretrain``: what a run needs to resume exactly.

A checkpoint holds the model, optimizer and scheduler states, the step (its epoch and the
position inside that epoch follow from it), the random-number generators' states, the run's
settings and its records so far. Resuming from it gives the numbers of the uninterrupted run on
the same machine and thread count.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Union

import torch

from .files import atomic_write
from .options import UsageError

__all__ = [
    "FORMAT", "CheckpointWriteError", "check_resumable", "load_checkpoint", "rng_state", "save_checkpoint",
    "set_rng_state",
]

FORMAT = 2
"""Version of the checkpoint layout. Version 1 (no format key) had no random-number state and
no position inside an epoch, so it cannot be resumed exactly and is refused."""

_KEYS = frozenset({
    "format", "settings", "world_size", "steps_per_epoch", "step", "model", "optimizer", "scheduler", "rng",
    "history", "step_losses", "epoch_sums", "epoch_seconds",
})


def rng_state(device: torch.device) -> dict[str, Any]:
    """The states of the generators a training step may draw from: torch's CPU one, the CUDA one
    of ``device`` (drop-path), Python's ``random`` (nothing here draws from it, but a timm
    model or a transform may). NumPy's is not used by the model or the transforms."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore :func:`rng_state`'s ``state``; the CUDA one only when it was saved on CUDA too."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class CheckpointWriteError(OSError):
    """The checkpoint could not be written (most often a full disk); the file at its path, if
    any, is the previous checkpoint, unchanged."""


def save_checkpoint(path: Union[str, Path], state: dict[str, Any]) -> None:
    """Write ``state`` (with :data:`FORMAT`) to ``path`` atomically (see :func:`atomic_write`).

    :raises CheckpointWriteError: the write failed. torch.save reports a write cut short, as on
        a full disk, as a RuntimeError ("unexpected pos ..."); the error names the free space.
    """
    try:
        atomic_write(path, lambda file: torch.save({"format": FORMAT, **state}, file))
    except (OSError, RuntimeError) as err:
        free_mib = shutil.disk_usage(Path(path).absolute().parent).free / 2**20
        raise CheckpointWriteError(
            f"--checkpoint {path}: could not write it: {err} ({free_mib:.0f} MiB free on its file system); "
            "any previous checkpoint there is unchanged"
        ) from err


def load_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint at ``--resume path``, checked to be a complete one of this format.

    :raises UsageError: no such file, not a checkpoint of ``lejepa-kernels pretrain``, or one of
        an older format.
    """
    if not Path(path).is_file():
        raise UsageError(f"--resume {path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises several types for files that are not checkpoints
        raise UsageError(f"--resume {path}: not a checkpoint of lejepa-kernels pretrain ({err})") from None
    if not isinstance(ckpt, dict) or not ({"format", "args"} & ckpt.keys()):
        raise UsageError(f"--resume {path}: not a checkpoint of lejepa-kernels pretrain")
    if ckpt.get("format") != FORMAT:
        raise UsageError(
            f"--resume {path}: written by an older lejepa-kernels pretrain (checkpoint format "
            f"{ckpt.get('format', 1)}, this one reads {FORMAT}), without the random-number state an exact "
            "resume needs; start a new run"
        )
    missing = sorted(_KEYS - ckpt.keys())
    if missing:
        raise UsageError(f"--resume {path}: incomplete checkpoint, it lacks {', '.join(missing)}")
    return ckpt


def check_resumable(ckpt: dict[str, Any], path: str, world_size: int, steps_per_epoch: int) -> None:
    """Refuse a checkpoint whose run had another number of processes or of steps per epoch (the
    --data directory has changed)."""
    if ckpt["world_size"] != world_size:
        raise UsageError(
            f"--resume {path}: the run had {ckpt['world_size']} process(es), this one has {world_size}; "
            "resume it with as many"
        )
    if ckpt["steps_per_epoch"] != steps_per_epoch:
        raise UsageError(
            f"--resume {path}: the run had {ckpt['steps_per_epoch']} steps per epoch, the data now give "
            f"{steps_per_epoch}; resume it on the same data"
        )
