"""The device of ``lejepa-kernels pretrain`` and its autocast."""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch

from .options import UsageError

__all__ = ["autocast", "resolve_device"]


def autocast(device: torch.device) -> ContextManager:
    """bf16 autocast on CUDA; nothing on the CPU, where it would run the small matmuls here slower."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def resolve_device(name: str, local_rank: int) -> torch.device:
    """The device of ``--device name`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``), made current
    when it is a CUDA one; ``cuda`` means device ``local_rank`` (one GPU per process under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    return device
