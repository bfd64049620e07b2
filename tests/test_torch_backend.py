"""The memory-bounded PyTorch path against the oracle: losses, gradients, dtypes, tiling; the
tests of dtypes and odd inputs also run the native CPU kernel."""

import pytest
import torch
from conftest import CPU_BACKENDS, assert_no_worse_than_seed, embeddings, loss_and_grad

from lejepa_kernels import FusedSlicedEppsPulley, ecf_sums, sliced_epps_pulley, torch_backend
from lejepa_kernels.reference import SlicedEppsPulley, quadrature, random_directions

SHAPES = [(37, 24, 19), (2, 3, 1), (300, 96, 257), (129, 7, 64)]


@pytest.mark.parametrize("N, D, S", SHAPES)
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_matches_oracle_over_steps(N, D, S, dtype, rtol):
    x = embeddings(N, D, dtype)
    fused = FusedSlicedEppsPulley(S, backend="torch")
    oracle = SlicedEppsPulley(S)
    for _ in range(3):
        loss, grad = loss_and_grad(fused, x)
        ref_loss, ref_grad = loss_and_grad(oracle, x)
        assert loss.dtype == ref_loss.dtype == dtype
        torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0)
        scale = ref_grad.abs().max()
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=rtol * scale)
    assert fused.global_step.item() == oracle.global_step.item() == 3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_error_no_worse_than_seed(dtype, backend):
    """Against an fp64 truth, our error in a dtype is within the seed's own error there."""
    N, D, S = 67, 48, 33
    x = embeddings(N, D, scale=0.7).to(dtype)
    truth_loss, truth_grad = loss_and_grad(SlicedEppsPulley(S), x.double())
    loss, grad = loss_and_grad(FusedSlicedEppsPulley(S, backend=backend), x)
    seed_loss, seed_grad = loss_and_grad(SlicedEppsPulley(S), x)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_no_worse_than_seed(loss, seed_loss, truth_loss, "loss")
    assert_no_worse_than_seed(grad, seed_grad, truth_grad, "grad")


def test_functional_matches_module():
    x = embeddings(41, 12, torch.float32)
    module = FusedSlicedEppsPulley(23, t_max=2.0, n_points=9, backend="torch")
    module.global_step.fill_(4)
    expected = module(x)
    got = sliced_epps_pulley(x, 4, 23, t_max=2.0, n_points=9, backend="torch")
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(sliced_epps_pulley(x, torch.tensor(4), 23, 2.0, 9, "torch"), expected)


@pytest.mark.parametrize("block_elements", [1, 7, 40, 1 << 20])
@pytest.mark.parametrize("dtype, dt, tol", [(torch.float64, 0.0, 1e-12), (torch.float32, 3.0 / 16, 2e-5)])
def test_blocks_and_recurrence_give_the_sums_and_gradient(block_elements, dtype, dt, tol):
    """Any block size; fp32 on the uniform grid takes the Chebyshev recurrence (fp64 never)."""
    N, D, S = 37, 24, 19
    x = embeddings(N, D)
    A = random_directions(D, S, 3).double()
    t = torch.arange(17, dtype=torch.float64) * (3.0 / 16)
    angles = (x @ A).unsqueeze(-1) * t
    cos_sums, sin_sums = (s[0] for s in torch_backend.ecf_sums(x.to(dtype)[None], A, t, dt, block_elements))
    assert cos_sums.dtype == dtype and cos_sums.shape == (S, 17)
    torch.testing.assert_close(cos_sums.double(), angles.cos().sum(0), rtol=0, atol=tol * N)
    torch.testing.assert_close(sin_sums.double(), angles.sin().sum(0), rtol=0, atol=tol * N)
    grad_cos, grad_sin = torch.randn(2, S, 17, dtype=torch.float64)
    grad_x = torch_backend.ecf_sums_backward(x.to(dtype)[None], A, t, grad_cos[None], grad_sin[None], dt,
                                             block_elements)[0]
    xr = x.clone().requires_grad_()
    angles = (xr @ A).unsqueeze(-1) * t
    ((angles.cos() * grad_cos).sum() + (angles.sin() * grad_sin).sum()).backward()
    assert grad_x.dtype == dtype
    torch.testing.assert_close(grad_x.double(), xr.grad, rtol=0, atol=tol * 10 * xr.grad.abs().max())


@pytest.mark.parametrize("T, bound", [(17, 3e-6), (65, 3e-5), (129, 1.5e-4)])
def test_recurrence_error_against_direct_trig(T, bound):
    """fp32 Chebyshev recurrence vs fp32 direct trig, both against fp64, |P| up to ~8."""
    N, D, S = 256, 16, 32
    x = embeddings(N, D, seed=2) * 2.0
    A = random_directions(D, S, 0).double()
    t = torch.arange(T, dtype=torch.float64) * (3.0 / (T - 1))
    angles = (x @ A).unsqueeze(-1) * t
    truth = angles.cos().sum(0), angles.sin().sum(0)
    recurrence = torch_backend.ecf_sums(x.float()[None], A, t, 3.0 / (T - 1))
    direct = torch_backend.ecf_sums(x.float()[None], A, t)
    for got_rec, got_dir, want in zip(recurrence, direct, truth):
        got_rec, got_dir = got_rec[0], got_dir[0]
        assert (got_rec.double() - want).abs().max() / N < bound
        assert (got_dir.double() - want).abs().max() / N < 1e-6


def test_gradcheck_fp64():
    x = embeddings(9, 5).requires_grad_()
    A = random_directions(5, 4, 0).double()
    t = quadrature(3.0, 5)[0].double()
    assert torch.autograd.gradcheck(lambda x: ecf_sums(x, A, t, backend="torch"), (x,))
    assert torch.autograd.gradcheck(lambda x: sliced_epps_pulley(x, 2, 4, 3.0, 5), (x,))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("view", ["transposed", "strided", "offset"])
def test_non_contiguous_input(view, backend):
    base = embeddings(48, 60, torch.float32)
    x = {"transposed": base.T[:37, :24], "strided": base[::2, ::2], "offset": base[5:42, 7:31]}[view]
    assert not x.is_contiguous()
    loss, grad = loss_and_grad(FusedSlicedEppsPulley(19, backend=backend), x)
    ref_loss, ref_grad = loss_and_grad(SlicedEppsPulley(19), x.contiguous())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert grad.shape == x.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_finite_input_gives_nan_not_an_error(backend):
    x = embeddings(37, 24, torch.float32)
    x[3, 5] = float("inf")
    x[7, 1] = float("nan")
    loss, grad = loss_and_grad(FusedSlicedEppsPulley(19, backend=backend), x)
    assert torch.isnan(loss)
    assert torch.isnan(grad).any()


@pytest.mark.parametrize(
    "n_points, backend",
    [(n, "torch") for n in (33, 129, 513, 1025)]
    + [pytest.param(n, "cpu", marks=CPU_BACKENDS[1].marks) for n in (33, 129)],
)
def test_long_grids_as_accurate_as_the_seed(n_points, backend):
    """Loss and gradient on long uniform grids: fp32 error against fp64 stays at the level of
    the default 17-point grid instead of growing with the grid."""
    x = embeddings(96, 16, seed=4)
    truth_loss, truth_grad = loss_and_grad(SlicedEppsPulley(24, n_points=n_points), x)
    loss, grad = loss_and_grad(FusedSlicedEppsPulley(24, n_points=n_points, backend=backend), x.float())
    assert abs(loss.double() - truth_loss) <= 2e-6 * truth_loss
    assert (grad.double() - truth_grad).abs().max() <= 2e-5 * truth_grad.abs().max()
