"""`swap_sigreg(model)`: replace the SIGReg modules inside an existing model by fused ones.

Recognised by class and module name, without importing their packages:

| class | module | replaced by |
| --- | --- | --- |
| `SlicedEppsPulley` | `stable_pretraining...` | `FusedSlicedEppsPulley` |
| `SlicingUnivariateTest` of an `EppsPulley` | `lejepa...` (official) | `compat.lejepa.SlicingUnivariateTest` |
| `SIGReg` | `lightly...` | `compat.lightly.SIGReg` |

Each replacement gets the original's settings and state (`global_step`, the grid buffers) by
`load_state_dict`, keeps its device, grid dtype and training mode, and has the same state_dict
keys, so checkpoints load both ways. Anything else, this package's modules included, is left alone.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from ..modules import FusedSlicedEppsPulley
from .lejepa import EppsPulley, SlicingUnivariateTest
from .lightly import SIGReg

__all__ = ["swap_sigreg"]


def _from(module: nn.Module, package: str, name: str) -> bool:
    """Whether module's class is `name`, defined in `package` or one of its submodules."""
    cls = type(module)
    return cls.__name__ == name and cls.__module__.split(".")[0] == package


def _stable_pretraining(old: nn.Module) -> nn.Module:
    return FusedSlicedEppsPulley(old.num_slices, n_points=old.ep.t.numel())


def _official(old: nn.Module) -> nn.Module:
    test = EppsPulley(n_points=old.univariate_test.t.numel())
    return SlicingUnivariateTest(test, old.num_slices, old.reduction, old.sampler, old.clip_value)


def _lightly(old: nn.Module) -> nn.Module:
    return SIGReg(old.t.numel(), num_vectors=old.num_vectors, gather_distributed=old.gather_distributed)


def _builder(module: nn.Module) -> Optional[Callable[[nn.Module], nn.Module]]:
    """How to build the fused equivalent of module, or None when it is not a SIGReg we know."""
    if _from(module, "stable_pretraining", "SlicedEppsPulley"):
        return _stable_pretraining
    if _from(module, "lejepa", "SlicingUnivariateTest") and _from(
        getattr(module, "univariate_test", None), "lejepa", "EppsPulley"
    ):
        return _official
    if _from(module, "lightly", "SIGReg"):
        return _lightly
    return None


def _fused(old: nn.Module, build: Callable[[nn.Module], nn.Module]) -> nn.Module:
    new = build(old)
    grid = next(buffer for name, buffer in old.named_buffers() if name.split(".")[-1] == "t")
    new.to(device=grid.device, dtype=grid.dtype)
    new.load_state_dict(old.state_dict(), strict=True)
    return new.train(old.training)


def swap_sigreg(model: nn.Module) -> int:
    """Replace, in place, every SIGReg module inside `model` (stable-pretraining's
    `SlicedEppsPulley`, the official LeJEPA `SlicingUnivariateTest(EppsPulley)`, lightly's
    `SIGReg`) by its fused equivalent, with the same state; returns how many were replaced
    (a module reachable under several names counts once and stays shared).

    After the swap the model gives the same loss for the same inputs and step (and global
    random state, for lightly's), to floating-point rounding, and its state_dict keys are
    unchanged. Swap before wrapping the model in DistributedDataParallel or torch.compile.
    Raises TypeError when `model` is not an nn.Module, ValueError when it is itself a SIGReg
    module (it cannot be replaced in place: build the fused one instead).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if _builder(model) is not None:
        raise ValueError(
            f"model is itself a {type(model).__qualname__}, which cannot be replaced in place; "
            "build the fused module from lejepa_kernels (or lejepa_kernels.compat) instead"
        )
    found: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, name, SIGReg module)
    pending = [model]
    while pending:
        parent = pending.pop()
        for name, child in parent._modules.items():  # every name, a shared module's too
            if child is None:
                continue
            if _builder(child) is None:
                pending.append(child)
            else:
                found.append((parent, name, child))
    fused: dict[int, nn.Module] = {}  # every replacement is built before any is put in place
    for _, _, child in found:
        if id(child) not in fused:
            fused[id(child)] = _fused(child, _builder(child))
    for parent, name, child in found:
        setattr(parent, name, fused[id(child)])
    return len(fused)
