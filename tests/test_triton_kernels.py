"""The fused Triton kernels against the oracle (on CPU through TRITON_INTERPRET, see conftest)."""

import pytest
import torch
from conftest import DEVICE

from lejepa_kernels import FusedSlicedEppsPulley, SlicedEppsPulley, ecf_sums
from lejepa_kernels.kernels import backward as backward_module
from lejepa_kernels.kernels import forward as forward_module
from lejepa_kernels.kernels.backward import slices_per_chunk
from lejepa_kernels.reference import quadrature, random_directions

pytest.importorskip("triton")


def embeddings(N, D, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(N, D, generator=g, dtype=torch.float64)


def loss_and_grad(module, x):
    x = x.detach().clone().requires_grad_()
    loss = module(x)
    loss.backward()
    return loss.detach().double(), x.grad.double()


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# Every value of N {2, 37, 300}, D {3, 24, 96}, S {1, 19, 257}, T {3, 17} at least once; N = 1 below.
SHAPES = [(2, 3, 1, 3), (37, 24, 19, 17), (300, 96, 257, 17), (37, 96, 1, 17), (300, 3, 19, 3), (2, 24, 257, 17)]


@pytest.mark.parametrize("N, D, S, T", SHAPES)
def test_fp32_matches_oracle_over_steps(N, D, S, T):
    x = embeddings(N, D).float().to(DEVICE)
    fused = FusedSlicedEppsPulley(S, n_points=T, backend="triton").to(DEVICE)
    oracle = SlicedEppsPulley(S, n_points=T).to(DEVICE)
    for _ in range(3):
        loss, grad = loss_and_grad(fused, x)
        ref_loss, ref_grad = loss_and_grad(oracle, x.double())
        assert relative(loss, ref_loss) < 1e-5
        assert relative(grad, ref_grad) < 2e-5
    assert fused.global_step.item() == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N, D, S", [(37, 24, 19), (300, 96, 257)])
def test_error_no_worse_than_seed_in_the_same_dtype(dtype, N, D, S):
    """Against the fp64 truth on the same (rounded) input: within the seed's own error, plus one
    unit of the dtype's rounding for the gradient (the kernels round A and dP to 16 bits in other
    places than the seed does)."""
    x = embeddings(N, D, seed=1, scale=0.8).to(dtype).to(DEVICE)
    truth_loss, truth_grad = loss_and_grad(SlicedEppsPulley(S).to(DEVICE), x.double())
    loss, grad = loss_and_grad(FusedSlicedEppsPulley(S, backend="triton").to(DEVICE), x)
    seed_loss, seed_grad = loss_and_grad(SlicedEppsPulley(S).to(DEVICE), x)
    loss_slack = 1e-5 * truth_loss.abs()
    grad_slack = max(torch.finfo(dtype).eps, 1e-5) * truth_grad.abs().max()
    assert (loss - truth_loss).abs() <= (seed_loss - truth_loss).abs() + loss_slack
    assert (grad - truth_grad).abs().max() <= (seed_grad - truth_grad).abs().max() + grad_slack


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_single_row_sums_and_gradient(dtype):
    x = embeddings(1, 24).to(dtype).to(DEVICE)
    A = random_directions(24, 19, 0, DEVICE)
    t = quadrature(3.0, 17)[0].to(DEVICE)
    xr = x.double().requires_grad_()
    angles = (xr @ A.double()).unsqueeze(-1) * t.double()
    want_cos, want_sin = angles.cos().sum(0), angles.sin().sum(0)
    grad_cos, grad_sin = torch.randn(2, 19, 17, dtype=torch.float64, device=DEVICE)
    ((want_cos * grad_cos).sum() + (want_sin * grad_sin).sum()).backward()
    xk = x.clone().requires_grad_()
    cos_sums, sin_sums = ecf_sums(xk, A, t, "triton", uniform_step=3.0 / 16)
    ((cos_sums * grad_cos).sum() + (sin_sums * grad_sin).sum()).backward()
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    assert (cos_sums - want_cos).abs().max() < tol and (sin_sums - want_sin).abs().max() < tol
    assert relative(xk.grad.double(), xr.grad) < 10 * tol


@pytest.mark.parametrize("T, bound", [(17, 3e-5), (65, 3e-4), (129, 1.5e-3)])
def test_recurrence_error_against_direct_trig(T, bound):
    """Chebyshev recurrence (uniform grid) vs direct trig (general grid) vs fp64, |P| up to ~8."""
    N, D, S = 64, 16, 32
    x = (embeddings(N, D, seed=2) * 2.0).float().to(DEVICE)
    A = random_directions(D, S, 0, DEVICE)
    t = quadrature(3.0, T)[0].to(DEVICE)
    angles = (x.double() @ A.double()).unsqueeze(-1) * t.double()
    truth = angles.cos().sum(0), angles.sin().sum(0)
    recurrence = ecf_sums(x, A, t, "triton", uniform_step=3.0 / (T - 1))
    direct = ecf_sums(x, A, t, "triton")
    for got_rec, got_dir, want in zip(recurrence, direct, truth):
        assert (got_rec.double() - want).abs().max() / N < bound
        assert (got_dir.double() - want).abs().max() / N < 3e-6


def test_several_row_splits_and_dp_chunks(monkeypatch):
    """Force the forward to split rows over programs and the backward to chunk the slices."""
    monkeypatch.setattr(forward_module, "program_count_target", lambda device: 64)
    monkeypatch.setattr(backward_module, "DP_CHUNK_BYTES", 300 * 4 * 64)
    x = embeddings(300, 24, seed=3).float().to(DEVICE)
    loss, grad = loss_and_grad(FusedSlicedEppsPulley(257, backend="triton").to(DEVICE), x)
    ref_loss, ref_grad = loss_and_grad(SlicedEppsPulley(257).to(DEVICE), x.double())
    assert relative(loss, ref_loss) < 1e-5 and relative(grad, ref_grad) < 2e-5


def test_chunk_sizes_respect_memory_and_grid_limits():
    assert slices_per_chunk(8192, 8192, 2, 64) * 8192 * 2 <= backward_module.DP_CHUNK_BYTES
    assert slices_per_chunk(8192, 100, 2, 64) == 100
    assert slices_per_chunk(10**8, 5000, 4, 64) == 64
    assert slices_per_chunk(2, 10**9, 4, 32) == 65535 * 32


@pytest.mark.parametrize("view", ["transposed", "strided", "offset"])
def test_non_contiguous_input(view):
    base = embeddings(48, 60, seed=4).float().to(DEVICE)
    x = {"transposed": base.T[:37, :24], "strided": base[::2, ::2], "offset": base[5:42, 7:31]}[view]
    assert not x.is_contiguous()
    loss, grad = loss_and_grad(FusedSlicedEppsPulley(19, backend="triton").to(DEVICE), x)
    ref_loss, ref_grad = loss_and_grad(SlicedEppsPulley(19).to(DEVICE), x.double())
    assert relative(loss, ref_loss) < 1e-5 and relative(grad, ref_grad) < 2e-5


def test_compiled_fullgraph_matches_eager():
    x = embeddings(37, 24, seed=5).float().to(DEVICE)
    eager = FusedSlicedEppsPulley(19, backend="triton").to(DEVICE)
    compiled_module = FusedSlicedEppsPulley(19, backend="triton").to(DEVICE)
    compiled = torch.compile(compiled_module, fullgraph=True)
    for _ in range(2):
        loss_c, grad_c = loss_and_grad(compiled, x)
        loss_e, grad_e = loss_and_grad(eager, x)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad_c, grad_e, rtol=1e-5, atol=1e-9)
    assert compiled_module.global_step.item() == 2


def test_fp64_is_refused():
    x = embeddings(5, 4).to(DEVICE)
    with pytest.raises(TypeError, match="fp64"):
        FusedSlicedEppsPulley(8, backend="triton").to(DEVICE)(x)
