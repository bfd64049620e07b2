"""Test session set-up: without a GPU, Triton kernels run in its CPU interpreter.

TRITON_INTERPRET must be set before triton is imported: importing torch does not import it, but
importing lejepa_kernels does (through torch.compile's machinery), so it is set here first. Also
the helpers the test modules share.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lejepa_kernels import cpu_library  # noqa: E402  (after TRITON_INTERPRET is set)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """After each test, forget what torch.compile compiled: the modules' forward is one code
    object, and dynamo recompiles it at most 8 times per process (then fullgraph=True fails), so
    compiled instances in earlier tests would make later compile tests fail."""
    yield
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


def has_c_compiler() -> bool:
    """Whether the native CPU kernel has a compiler to try: where one exists, its build must work
    (the kernel's tests fail rather than skip)."""
    try:
        cpu_library._compiler()
    except cpu_library.CpuKernelUnavailable:
        return False
    return True


CPU_BACKENDS = [
    "torch",
    pytest.param("cpu", marks=pytest.mark.skipif(not has_c_compiler(), reason="no C compiler here")),
]
"""The backends that take CPU tensors: the PyTorch path and the native kernel."""


def embeddings(N, D, dtype=torch.float64, seed=0, scale=1.0):
    """[N, D] standard normal rows (times scale), drawn in fp64 then cast to dtype."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(N, D, generator=g, dtype=torch.float64)).to(dtype)


def uniform_grid(n_points, dt):
    """The grid t_k = k * dt, [n_points] fp32."""
    return torch.arange(n_points, dtype=torch.float32) * dt


def loss_and_grad(module, x):
    """(loss, dloss/dx) of module at a detached copy of x."""
    x = x.detach().clone().requires_grad_()
    loss = module(x)
    loss.backward()
    return loss.detach(), x.grad


def assert_no_worse_than_seed(got, seed, truth, what="value", rounded=None):
    """Element by element, got's error against the fp64 truth is within the seed's own error in
    the same dtype plus one slack: max(eps of got's dtype, 1e-5) * max |truth| (one rounding of
    the result, or the fp32 noise floor). `rounded`: the fp64 value with the directions rounded
    to x's dtype (as the seed and the kernels round them); its error is allowed too, since the
    seed's other roundings may cancel part of it by chance. On failure, names the worst element."""
    slack = max(torch.finfo(got.dtype).eps, 1e-5) * truth.abs().max().item()
    got, seed, truth = got.detach().double(), seed.detach().double(), truth.detach().double()
    allowed = (seed - truth).abs()
    if rounded is not None:
        allowed = torch.maximum(allowed, (rounded.detach().double() - truth).abs())
    excess = (got - truth).abs() - allowed - slack
    if excess.numel() and excess.max() > 0:
        flat = int(excess.argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), excess.shape))
        g, s, t = got.flatten()[flat].item(), seed.flatten()[flat].item(), truth.flatten()[flat].item()
        raise AssertionError(
            f"{what}{list(index) if index else ''}: got {g:.8g}, the seed {s:.8g}, fp64 {t:.8g}: error "
            f"{abs(g - t):.3g} > the seed's {abs(s - t):.3g} (or the rounded directions') + slack {slack:.3g}"
        )


def grouped_oracle(x, A, t_max, n_points, unbiased=False):
    """The Epps-Pulley statistics (*, S) of x (*, N, D) on directions A [D, S], in fp64 from the
    definition: phi_hat(t) = mean_n exp(i t p_n) per group and slice, |phi_hat|^2 plug-in or
    (|sum_n exp(i t p_n)|^2 - N) / (N (N - 1)), on the seed's grid (its fp32 t, phi and
    trapezoid weights times phi, as the modules' buffers hold them). Differentiable."""
    from lejepa_kernels.reference import quadrature

    t, phi, weights = (v.double() for v in quadrature(t_max, n_points))
    angles = (x.double() @ A.double()).unsqueeze(-1) * t  # (*, N, S, T)
    cos_total, sin_total = angles.cos().sum(-3), angles.sin().sum(-3)
    n = x.shape[-2]
    square = cos_total.square() + sin_total.square()
    square = (square - n) / (n * (n - 1)) if unbiased else square / n**2
    err = square - 2 * phi * cos_total / n + phi.square()
    return n * (err * weights).sum(-1)
