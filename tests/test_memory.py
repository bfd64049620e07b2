"""Structural memory: the PyTorch path never allocates nor saves an [N, S, T] (or [N, S]) tensor."""

import pytest
import torch
from conftest import uniform_grid
from torch.utils._python_dispatch import TorchDispatchMode

from lejepa_kernels import FusedSlicedEppsPulley, cpu_backend, cpu_library, torch_backend
from lejepa_kernels.reference import SlicedEppsPulley, quadrature, random_directions

N, D, S, T = 160, 24, 1200, 17


class LargestAllocation(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def largest_saved(module, x):
    largest = 0

    def pack(tensor):
        nonlocal largest
        largest = max(largest, tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x)
    return largest


def test_seed_does_materialise_n_s_t():
    """The probe works: the oracle's [N, S, T] tensors are seen, saved and allocated."""
    x = torch.randn(N, D, requires_grad=True)
    assert largest_saved(SlicedEppsPulley(S), x) == N * S * T
    with LargestAllocation() as probe:
        SlicedEppsPulley(S)(x).backward()
    assert probe.largest == N * S * T


def test_autograd_saves_only_inputs_and_small_tensors():
    x = torch.randn(N, D, requires_grad=True)
    assert largest_saved(FusedSlicedEppsPulley(S, backend="torch"), x) <= max(N * D, D * S)


def test_kernels_allocate_only_bounded_blocks():
    """Inside the op: the largest tensor is a cos/sin pair of blocks (or the [2, T, S] sums),
    far below N*S (and N*S*T)."""
    block = 4096
    x = torch.randn(N, D)
    A = random_directions(D, S, 0)
    t = quadrature(3.0, T)[0]
    with LargestAllocation() as probe:
        for dt in (0.0, 3.0 / (T - 1)):
            cos_sums, sin_sums = torch_backend.ecf_sums(x[None], A, t, dt, block)
            torch_backend.ecf_sums_backward(x[None], A, t, cos_sums, sin_sums, dt, block)
    assert probe.largest <= max(2 * block, N * D, D * S, 2 * T * S)
    assert probe.largest < N * S


@pytest.mark.skipif(cpu_library.unavailable_reason() is not None, reason="no native CPU kernel here")
def test_cpu_kernel_allocates_only_bounded_blocks():
    """The native kernel's torch side: cos and sin of one block, the fp64 [2, T, S] sums."""
    block = 4096
    x = torch.randn(N, D)
    A = random_directions(D, S, 0)
    t = quadrature(3.0, T)[0]
    dt = 3.0 / (T - 1)
    with LargestAllocation() as probe:
        cos_sums, sin_sums = cpu_backend.ecf_sums(x[None], A, uniform_grid(T, dt), dt, block)
        cpu_backend.ecf_sums_backward(x[None], A, t, cos_sums, sin_sums, dt, block)
    assert probe.largest <= max(block, N * D, D * S, 2 * T * S)
    assert probe.largest < N * S


def test_module_outside_the_op_allocates_no_n_s_tensor():
    x = torch.randn(N, D, requires_grad=True)
    with LargestAllocation() as probe:
        FusedSlicedEppsPulley(S, backend="torch")(x).backward()
    assert probe.largest <= max(N * D, D * S, 2 * S * T + 1)
