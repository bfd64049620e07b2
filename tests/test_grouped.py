"""Grouped SIGReg: x of shape (*, N, D), one statistic per group, reductions, the unbiased form.

Every number is checked against `conftest.grouped_oracle` (fp64, from the definition) on the
step's directions; the groups hold unequal content (each its own scale and shift).
"""

import itertools
import math

import pytest
import torch
from conftest import CPU_BACKENDS, DEVICE, grouped_oracle

from lejepa_kernels import FusedSlicedEppsPulley, backends, cpu_backend, ecf_sums, sliced_epps_pulley, torch_backend
from lejepa_kernels.reference import SlicedEppsPulley, quadrature, random_directions

D, S, T_MAX, N_POINTS, STEP = 12, 19, 3.0, 17, 5
SHAPES = {"G=1": (1,), "G=2": (2,), "G=7": (7,), "4-D": (2, 3)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def grouped_embeddings(lead, n, d=D, seed=0, dtype=torch.float64):
    """(*lead, n, d): group g is standard normal times (0.6 + 0.25 g) plus 0.3 g."""
    g = torch.Generator().manual_seed(seed)
    groups = math.prod(lead)
    scale = 0.6 + 0.25 * torch.arange(groups, dtype=torch.float64).view(groups, 1, 1)
    shift = 0.3 * torch.arange(groups, dtype=torch.float64).view(groups, 1, 1)
    x = torch.randn(groups, n, d, generator=g, dtype=torch.float64) * scale + shift
    return x.view(*lead, n, d).to(dtype)


def stat_and_grad(fn, x, weights):
    """(fn(x), d sum(fn(x) * weights) / dx) at a detached copy of x."""
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    (out * weights).sum().backward()
    return out.detach(), x.grad


def assert_matches_oracle(fn, x, unbiased, rtol):
    """fn(x) -> (*, S) statistics and their gradient against the fp64 oracle on x as given."""
    A = random_directions(x.shape[-1], S, STEP, x.device)
    weights = torch.randn(*x.shape[:-2], S, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights = weights.to(x.device)
    got, grad = stat_and_grad(fn, x, weights.to(torch.float64 if x.dtype == torch.float64 else torch.float32))
    want, want_grad = stat_and_grad(lambda z: grouped_oracle(z, A, T_MAX, N_POINTS, unbiased), x.double(), weights)
    assert got.shape == want.shape and grad.shape == x.shape and grad.dtype == x.dtype
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * want.abs().max())
    grad_tol = max(rtol, torch.finfo(x.dtype).eps)  # dx is returned in x's dtype: one rounding
    torch.testing.assert_close(grad.double(), want_grad, rtol=0, atol=grad_tol * want_grad.abs().max())


@pytest.mark.parametrize("unbiased", [False, True], ids=["plug-in", "unbiased"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("lead", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_statistics_and_gradients_against_fp64(backend, lead, dtype, unbiased):
    """reduction="none": each group's (*, S) statistics and the gradient of a weighted sum."""
    if backend == "cpu" and dtype == torch.float64:
        pytest.skip("the native kernel takes fp32, bf16 and fp16")
    x = grouped_embeddings(lead, 37, dtype=dtype)
    module = FusedSlicedEppsPulley(S, T_MAX, N_POINTS, backend=backend, reduction="none", unbiased=unbiased)
    module.global_step.fill_(STEP)
    assert_matches_oracle(module, x, unbiased, 1e-10 if dtype == torch.float64 else 2e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("unbiased", [False, True], ids=["plug-in", "unbiased"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reductions(backend, reduction, unbiased):
    """mean and sum over every group and slice (0-d), or the statistics themselves (*, S)."""
    x = grouped_embeddings((3, 2), 21, seed=3, dtype=torch.float32)
    A = random_directions(D, S, STEP)
    reduce = {"mean": torch.mean, "sum": torch.sum, "none": lambda stats: stats}[reduction]
    want, want_grad = stat_and_grad(
        lambda z: reduce(grouped_oracle(z, A, T_MAX, N_POINTS, unbiased)), x.double(), torch.tensor(1.0)
    )
    got, grad = stat_and_grad(
        lambda z: sliced_epps_pulley(z, STEP, S, T_MAX, N_POINTS, backend, reduction=reduction, unbiased=unbiased),
        x, torch.tensor(1.0),
    )
    assert got.shape == want.shape == ((3, 2, S) if reduction == "none" else ()) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5 * want.abs().max())
    torch.testing.assert_close(grad.double(), want_grad, rtol=0, atol=2e-5 * want_grad.abs().max())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_two_dimensional_input_keeps_the_seeds_numbers(backend):
    """[N, D]: the seed's loss; [S] statistics for "none"; the same bits as one group [1, N, D]."""
    x = grouped_embeddings((), 53, dtype=torch.float32)
    seed = SlicedEppsPulley(S, T_MAX, N_POINTS)
    seed.global_step.fill_(STEP)
    loss = sliced_epps_pulley(x, STEP, S, T_MAX, N_POINTS, backend)
    torch.testing.assert_close(loss, seed(x), rtol=1e-5, atol=0)
    one_group = sliced_epps_pulley(x[None], STEP, S, T_MAX, N_POINTS, backend)
    assert torch.equal(loss, one_group)
    stats = sliced_epps_pulley(x, STEP, S, T_MAX, N_POINTS, backend, reduction="none")
    assert stats.shape == (S,) and torch.equal(stats.mean(), loss)
    cos_sums, sin_sums = ecf_sums(x, random_directions(D, S, STEP), quadrature(T_MAX, N_POINTS)[0], backend,
                                  dt=T_MAX / (N_POINTS - 1))
    assert cos_sums.shape == sin_sums.shape == (S, N_POINTS)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_each_group_is_its_own_batch_on_the_steps_directions(backend):
    """Group g's statistics are those of x[g] alone at the same step; ecf_sums is per group."""
    x = grouped_embeddings((7,), 30, seed=4, dtype=torch.float32)
    together = sliced_epps_pulley(x, STEP, S, T_MAX, N_POINTS, backend, reduction="none")
    for g in range(7):
        alone = sliced_epps_pulley(x[g], STEP, S, T_MAX, N_POINTS, backend, reduction="none")
        torch.testing.assert_close(together[g], alone, rtol=1e-6, atol=1e-6 * alone.abs().max())
    A, t = random_directions(D, S, 0), quadrature(T_MAX, N_POINTS)[0]
    cos_sums, sin_sums = ecf_sums(x.view(7, 1, 30, D), A, t, backend, dt=T_MAX / (N_POINTS - 1))
    angles = (x.double() @ A.double()).unsqueeze(-1) * t.double()
    assert cos_sums.shape == (7, 1, S, N_POINTS)
    torch.testing.assert_close(cos_sums[:, 0].double(), angles.cos().sum(-3), rtol=0, atol=3e-6 * 30)
    torch.testing.assert_close(sin_sums[:, 0].double(), angles.sin().sum(-3), rtol=0, atol=3e-6 * 30)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_unbiased_expectation_is_the_distance_exactly(n):
    """Rows drawn from {a, b} with probability 1/2 each, every one of the 2^n samples of n rows
    as a group (D = 1: the directions are +-1), so the mean over groups is the expectation.
    The unbiased statistic's is n sum_k w_k |phi_X(t_k) - phi(t_k)|^2; the plug-in's adds
    sum_k w_k (1 - |phi_X(t_k)|^2)."""
    a, b = -0.7, 1.9
    x = torch.tensor(list(itertools.product([a, b], repeat=n)), dtype=torch.float64).unsqueeze(-1)
    t, phi, weights = (v.double() for v in quadrature(T_MAX, N_POINTS))
    phi_x = (torch.exp(1j * t * a) + torch.exp(1j * t * b)) / 2
    distance = (weights * (phi_x - phi).abs().square()).sum()
    noise = (weights * (1 - phi_x.abs().square())).sum()
    unbiased, plug_in = (
        sliced_epps_pulley(x, STEP, S, T_MAX, N_POINTS, "torch", reduction="none", unbiased=u).mean(0)
        for u in (True, False)
    )
    torch.testing.assert_close(unbiased, torch.full((S,), n * distance.item(), dtype=torch.float64),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(plug_in, unbiased + noise, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_pass_for_every_group(backend, monkeypatch):
    """G groups of N rows take as many projection blocks (and kernel calls) as one batch of
    G*N rows: no loop over the groups outside the kernels."""
    module = torch_backend if backend == "torch" else cpu_backend
    project, calls = torch_backend.project, []

    def counting(x, A, rows, cols):
        calls.append(x.shape[0])
        return project(x, A, rows, cols)

    monkeypatch.setattr(module, "project", counting)
    x = grouped_embeddings((7,), 64, dtype=torch.float32)
    A, t, dt = random_directions(D, 300, 0), quadrature(T_MAX, N_POINTS)[0], T_MAX / (N_POINTS - 1)
    grads = torch.ones(7, 300, N_POINTS)
    module.ecf_sums(x, A, t, dt, 4096)
    module.ecf_sums_backward(x, A, t, grads, grads, dt, 4096)
    grouped = len(calls)
    calls.clear()
    module.ecf_sums(x.reshape(1, 7 * 64, D), A, t, dt, 4096)
    module.ecf_sums_backward(x.reshape(1, 7 * 64, D), A, t, grads[:1], grads[:1], dt, 4096)
    assert calls == [1] * grouped


def test_compiled_fullgraph_on_grouped_input():
    x = grouped_embeddings((2, 3), 25, seed=6, dtype=torch.float32)
    compiled_module = FusedSlicedEppsPulley(32, unbiased=True)
    eager_module = FusedSlicedEppsPulley(32, unbiased=True)
    compiled = torch.compile(compiled_module, fullgraph=True)
    for step in range(2):
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss_c, loss_e = compiled(xc), eager_module(xe)
        loss_c.backward(), loss_e.backward()
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-8)
        assert compiled_module.global_step.item() == step + 1
    want = grouped_oracle(x, random_directions(D, 32, 1), 3.0, 17, unbiased=True).mean()
    torch.testing.assert_close(loss_c.double(), want, rtol=2e-5, atol=0)


@pytest.mark.parametrize("lead", [(1,), (2,), (7,), (1, 1), (2, 3)], ids=["G1", "G2", "G7", "1x1", "2x3"])
def test_triton_takes_every_group_in_one_launch(monkeypatch, lead):
    """The Triton kernels (in the interpreter, or on the GPU) against fp64, for G = 1, 2, 7 and
    4-D input: one forward launch and one backward launch per call, whatever G."""
    pytest.importorskip("triton")
    from lejepa_kernels.kernels import backward, forward

    launches = []
    for module, name in ((forward, "_ecf_forward_kernel"), (backward, "_ecf_backward_kernel")):
        kernel = getattr(module, name)

        class Counted:
            def __getitem__(self, grid, kernel=kernel, name=name):
                launches.append(name)
                return kernel[grid]

        monkeypatch.setattr(module, name, Counted())
    x = grouped_embeddings(lead, 37, seed=7, dtype=torch.float32).to(DEVICE)
    module = FusedSlicedEppsPulley(S, T_MAX, N_POINTS, backend="triton", reduction="none", unbiased=True)
    module.global_step.fill_(STEP)
    assert_matches_oracle(module.to(DEVICE), x, True, 2e-4)
    assert launches == ["_ecf_forward_kernel", "_ecf_backward_kernel"]
    probe = torch.empty(2, 9, D, device=DEVICE)
    assert backends.choose("triton", probe, N_POINTS, 0.1) == "triton"


def test_bad_options_and_shapes():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="reduction must be one of"):
        FusedSlicedEppsPulley(8, reduction="avg")
    with pytest.raises(ValueError, match="reduction must be one of"):
        sliced_epps_pulley(x, 0, 8, reduction="avg")
    with pytest.raises(TypeError, match="unbiased must be a bool, got 'yes'"):
        FusedSlicedEppsPulley(8, unbiased="yes")
    with pytest.raises(TypeError, match="unbiased must be a bool"):
        sliced_epps_pulley(x, 0, 8, unbiased=1)
    with pytest.raises(ValueError, match=r"x must be \[N, D\].*or \(\*, N, D\).*got shape \(5,\)"):
        FusedSlicedEppsPulley(8)(torch.randn(5))
    with pytest.raises(ValueError, match=r"at least 2 rows per group, got shape \(3, 1, 4\)"):
        FusedSlicedEppsPulley(8, unbiased=True)(torch.randn(3, 1, 4))
    with pytest.raises(ValueError, match=r"at least one group of rows, got shape \(0, 5, 3\)"):
        FusedSlicedEppsPulley(8)(torch.randn(0, 5, 3))
    with pytest.raises(ValueError, match=r"A must be \[D, S\] with D = x.shape\[-1\] = 3"):
        ecf_sums(x, torch.randn(4, 8), torch.arange(5.0))
