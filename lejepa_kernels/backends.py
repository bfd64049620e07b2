"""The backend table: which code computes the ECF sums of a call, and why.

Each backend is a module with one interface:

- `NAME`: its name, as `backend=` takes it;
- `unavailable() -> str | None`: why it cannot run on this machine at all (None: it can);
- `unsupported(x, n_points, dt) -> str | None`: why it does not take this call (only x's
  dtype and device are read);
- `ecf_sums(x, A, t, dt) -> (cos_sums, sin_sums)` and
  `ecf_sums_backward(x, A, t, grad_cos, grad_sin, dt) -> grad_x`, with x [G, N, D], the sums
  and their gradients [G, S, T], grad_x [G, N, D].

`choose` is the one place that decides: "auto" (or `$LEJEPA_KERNELS_BACKEND`) takes the first
backend of `AUTO_ORDER` for the embeddings' device that runs here and takes the call; a backend named explicitly runs or
raises, saying why.
"""

from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType

import torch

from . import cpu_backend, torch_backend, triton_backend
from .cpu_library import CpuKernelUnavailable

TABLE: dict[str, ModuleType] = {module.NAME: module for module in (torch_backend, cpu_backend, triton_backend)}
"""Every backend, by name: "torch" (the PyTorch path), "cpu" (the native C kernel), "triton"."""
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}
"""Preference of "auto" by the embeddings' device type (others: "torch"): the first backend that
runs here and takes the call. Triton's interpreter is never chosen by "auto"."""
BACKEND_ENV = "LEJEPA_KERNELS_BACKEND"
CHOICES = ("auto",) + tuple(TABLE)


class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot run on this machine (the message says why)."""


def check_choice(backend: str) -> None:
    """Raise ValueError unless backend is one of CHOICES."""
    if backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")


def _unavailable(name: str) -> str:
    """Why backend `name` cannot run here ("" when it can): a constant for torch.compile, which
    calls it instead of tracing a build of the CPU kernel."""
    return TABLE[name].unavailable() or ""


# The mark that `torch.compiler.assume_constant_result` sets, set without calling it: it imports
# torch._dynamo, and with it triton, which `import lejepa_kernels` must not (tests/test_imports.py
# checks that the two marks agree).
_unavailable._dynamo_marked_constant = True  # type: ignore[attr-defined]


def choose(backend: str, x: torch.Tensor, n_points: int, dt: float) -> str:
    """The name of the backend that computes this call.

    x: the embeddings (their dtype and device decide); n_points: T; dt > 0 for the uniform
    grid, 0 for any other.
    "auto" (or `$LEJEPA_KERNELS_BACKEND` when set) picks per AUTO_ORDER, warning once when the
    native CPU kernel cannot be built; an explicit backend that cannot run here raises
    BackendUnavailable (CpuKernelUnavailable for "cpu"), one that does not take the call
    ValueError.
    """
    check_choice(backend)
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto")
        if backend not in CHOICES:
            raise ValueError(f"${BACKEND_ENV} must be one of {CHOICES}, got {backend!r}")
    if backend == "auto":
        return _auto(x, n_points, dt)
    reason = _unavailable(backend)
    if reason:
        error = CpuKernelUnavailable if backend == "cpu" else BackendUnavailable
        raise error(f"backend={backend!r} cannot run here: {reason}; use backend='auto' or 'torch'")
    reason = TABLE[backend].unsupported(x, n_points, dt)
    if reason:
        raise ValueError(f"backend={backend!r} does not take this call: {reason}; use backend='auto' or 'torch'")
    return backend


def _auto(x: torch.Tensor, n_points: int, dt: float) -> str:
    for name in AUTO_ORDER.get(x.device.type, ("torch",)):
        if TABLE[name].unsupported(x, n_points, dt) is not None:
            continue
        reason = _unavailable(name)
        if not reason:
            return name
        if name == "cpu":
            _warn_once(f"lejepa_kernels: using the slower PyTorch path on the CPU: {reason}")
    raise AssertionError("the PyTorch backend takes every call")  # torch_backend.unsupported is None


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=5)
