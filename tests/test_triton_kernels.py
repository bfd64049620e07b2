"""The fused Triton kernels against the oracle (on CPU through TRITON_INTERPRET, see conftest)."""

import numpy as np
import pytest
import torch
from conftest import DEVICE, assert_no_worse_than_seed, embeddings, loss_and_grad

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lejepa_kernels import FusedSlicedEppsPulley, ecf_sums, torch_backend  # noqa: E402
from lejepa_kernels.kernels import (  # noqa: E402
    BACKWARD_CANDIDATES,
    FORWARD_CANDIDATES,
    ecf_backward,
    ecf_forward,
)
from lejepa_kernels.kernels import backward as backward_module  # noqa: E402
from lejepa_kernels.kernels import forward as forward_module  # noqa: E402
from lejepa_kernels.kernels._tiles import sincos  # noqa: E402
from lejepa_kernels.kernels.backward import slices_per_chunk  # noqa: E402
from lejepa_kernels.reference import EppsPulley, SlicedEppsPulley, quadrature, random_directions  # noqa: E402


def relative(a, b):
    """max |a - b| / max |b|, in fp64."""
    a, b = a.double(), b.double()
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
@pytest.mark.parametrize("N, D, S, seed", [(37, 24, 19, 1), (300, 96, 257, 1), (300, 96, 257, 2)])
def test_error_no_worse_than_seed_in_the_same_dtype(dtype, N, D, S, seed):
    """Against the fp64 truth on the same (rounded) input: within the seed's own error, or that of
    rounding the directions to x's dtype (both round them; the seed's rounding of x @ A may cancel
    part of it by chance: at seed 2 in bf16 its error is 8.8e-5 of the loss, the rounded
    directions' 1.6e-4), plus one unit of the dtype's rounding for the gradient (the kernels round
    A and dP to 16 bits in other places than the seed does)."""
    x = embeddings(N, D, seed=seed, scale=0.8).to(dtype).to(DEVICE)
    truth_loss, truth_grad = loss_and_grad(SlicedEppsPulley(S).to(DEVICE), x.double())
    loss, grad = loss_and_grad(FusedSlicedEppsPulley(S, backend="triton").to(DEVICE), x)
    seed_loss, seed_grad = loss_and_grad(SlicedEppsPulley(S).to(DEVICE), x)
    A = random_directions(D, S, 0, DEVICE).to(dtype).double()
    statistic = EppsPulley().to(DEVICE)
    rounded_loss, rounded_grad = loss_and_grad(lambda z: statistic(z @ A).mean(), x.double())
    assert_no_worse_than_seed(loss, seed_loss, truth_loss, "loss", rounded=rounded_loss)
    assert_no_worse_than_seed(grad, seed_grad, truth_grad, "grad", rounded=rounded_grad)


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
    cos_sums, sin_sums = ecf_sums(xk, A, t, "triton", dt=3.0 / 16)
    ((cos_sums * grad_cos).sum() + (sin_sums * grad_sin).sum()).backward()
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    assert (cos_sums - want_cos).abs().max() < tol and (sin_sums - want_sin).abs().max() < tol
    assert relative(xk.grad.double(), xr.grad) < 10 * tol


def test_several_row_splits_and_dp_chunks(monkeypatch):
    """Force the forward to split rows over programs and the backward to chunk the slices."""
    monkeypatch.setattr(forward_module, "program_count_target", lambda device: 64)
    monkeypatch.setattr(backward_module, "DP_CHUNK_BYTES", 300 * 4 * 64)
    x = embeddings(300, 24, seed=3).float().to(DEVICE)
    loss, grad = loss_and_grad(FusedSlicedEppsPulley(257, backend="triton").to(DEVICE), x)
    ref_loss, ref_grad = loss_and_grad(SlicedEppsPulley(257).to(DEVICE), x.double())
    assert relative(loss, ref_loss) < 1e-5 and relative(grad, ref_grad) < 2e-5


def test_chunk_sizes_respect_memory_and_grid_limits():
    budget = 32 << 20
    assert slices_per_chunk(8192, 8192, 2, 64, budget) * 8192 * 2 <= budget
    assert slices_per_chunk(8192, 8192, 2, 64, 1 << 30) == 8192  # the paper workload: one chunk
    assert slices_per_chunk(8192, 100, 2, 64, budget) == 100
    assert slices_per_chunk(10**8, 5000, 4, 64, budget) == 64
    assert slices_per_chunk(2, 10**9, 4, 32, budget) == 65535 * 32


def test_dp_budget_is_bounded():
    assert backward_module.dp_budget(torch.device("cpu")) == backward_module.DP_CHUNK_BYTES
    if DEVICE.type == "cuda":
        assert 0 < backward_module.dp_budget(DEVICE) <= backward_module.DP_CHUNK_BYTES


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_candidate_configuration_gives_the_numbers(dtype):
    """Each configuration tuning may choose gives the sums and dx of the fp64 oracle (and so of
    each other, to rounding), on a ragged shape whose rows span several row blocks."""
    N, D, S, T = 150, 40, 70, 17
    x = embeddings(N, D, seed=12).to(dtype).to(DEVICE)
    A = random_directions(D, S, 0, DEVICE)
    t = quadrature(3.0, T)[0].to(DEVICE)
    grad_cos, grad_sin = (torch.randn(2, S, T, generator=torch.Generator().manual_seed(12)) / S).to(DEVICE)
    A_read = A.to(dtype).double()  # the kernels multiply A rounded to x's dtype
    want = [s[0] for s in torch_backend.ecf_sums(x.double()[None], A_read, t.double())]
    want_dx = torch_backend.ecf_sums_backward(
        x.double()[None], A_read, t.double(), grad_cos.double()[None], grad_sin.double()[None]
    )[0]
    dx_tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    for config in FORWARD_CANDIDATES[dtype]:
        sums = ecf_forward(x, A, t, 3.0 / 16, config)
        assert max((got.double() - ref).abs().max().item() for got, ref in zip(sums, want)) / N < 1e-6, config
    for config in BACKWARD_CANDIDATES[dtype]:
        dx = ecf_backward(x, A, t, grad_cos, grad_sin, 3.0 / 16, config)
        assert relative(dx, want_dx) < dx_tol, config


@pytest.mark.parametrize("row_blocks", [1, 2, 9])
def test_row_walks_of_one_two_and_many_blocks(monkeypatch, row_blocks):
    """One program per slice tile walks all rows: 1, 2 or 9 row blocks (the last one ragged),
    its sums kept in registers across the walk and written once."""
    monkeypatch.setattr(forward_module, "program_count_target", lambda device: 1)
    config = FORWARD_CANDIDATES[torch.float32][0]
    N, D, S, T = (row_blocks - 1) * config.block_n + 5, 24, 19, 17
    x = embeddings(N, D, seed=13).float().to(DEVICE)
    A, t = random_directions(D, S, 0, DEVICE), quadrature(3.0, T)[0].to(DEVICE)
    want = [s[0] for s in torch_backend.ecf_sums(x.double()[None], A.double(), t.double())]
    for dt in (3.0 / 16, 0.0):
        sums = ecf_forward(x, A, t, dt, config)
        assert max((got.double() - ref).abs().max().item() for got, ref in zip(sums, want)) / N < 3e-7


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
        ecf_forward(x, random_directions(4, 8, 0, DEVICE), quadrature(3.0, 17)[0].to(DEVICE), 0.0)


def test_bf16_gradient_accumulates_chunks_in_fp32(monkeypatch):
    """dx = sum over slice chunks of dP @ A^T: with 32 chunks, the same dx (to fp32 rounding of
    the sum, then one bf16 rounding) as with one chunk, and as close to the fp64 truth."""
    N, D, S = 37, 24, 32 * 32
    x = embeddings(N, D, seed=9).bfloat16()
    A = random_directions(D, S, 0, DEVICE)
    t = quadrature(3.0, 17)[0].to(DEVICE)
    grad_cos, grad_sin = torch.randn(2, S, 17, generator=torch.Generator().manual_seed(9)) / S
    truth = torch_backend.ecf_sums_backward(x.double().to(DEVICE)[None], A.bfloat16().double(), t.double(),
                                            grad_cos.double().to(DEVICE)[None], grad_sin.double().to(DEVICE)[None])
    truth = truth[0].cpu()  # the oracle on the kernels' device: x and the seeds are drawn on the CPU

    def grad_x(chunk_slices):
        monkeypatch.setattr(backward_module, "DP_CHUNK_BYTES", N * 2 * chunk_slices)
        return ecf_backward(x.to(DEVICE), A, t, grad_cos.to(DEVICE), grad_sin.to(DEVICE), 3.0 / 16)

    one, many = grad_x(S).double().cpu(), grad_x(32).double().cpu()
    ulp = torch.finfo(torch.bfloat16).eps * truth.abs()
    assert ((many - one).abs() <= ulp).all()
    assert (many != one).double().mean() < 0.05
    assert ((many - truth).abs() / truth.abs().max()).max() < 1e-2


@pytest.mark.parametrize("T", [17, 33, 129, 1025])
def test_recurrence_as_accurate_as_direct_trig(T):
    """The recurrence on t_k = k dt against direct fp32 trig on the same t, both against fp64:
    sums and gradient, from the default grid to 1025 points (restarts from T = 33 on)."""
    N, D, S = 37, 8, 5
    x = embeddings(N, D, seed=10).float().to(DEVICE)
    A = random_directions(D, S, 0, DEVICE)
    t = quadrature(3.0, T)[0].to(DEVICE)
    g = torch.Generator().manual_seed(T)
    grad_cos, grad_sin = (torch.randn(2, S, T, generator=g) / T).to(DEVICE)
    P = x.double() @ A.double()
    want = [s[0] for s in torch_backend.ecf_sums(x.double()[None], A.double(), t.double())]
    want_dx = torch_backend.ecf_sums_backward(x.double()[None], A.double(), t.double(),
                                              grad_cos.double()[None], grad_sin.double()[None])[0]

    def errors(dt):
        sums = ecf_forward(x, A, t, dt)
        dx = ecf_backward(x, A, t, grad_cos, grad_sin, dt)
        sum_error = max((got.double() - ref).abs().max().item() for got, ref in zip(sums, want))
        return sum_error / N, (dx.double() - want_dx).abs().max().item() / want_dx.abs().max().item()

    assert P.abs().max() * 3.0 > 8  # angles up to 3 |P|: more than a turn
    # Within the bounds direct trig meets (run up to 129 points: in the interpreter its cost
    # grows with T, its error does not): mean error per row of the sums, relative error of dx.
    for dt in (3.0 / (T - 1), 0.0) if T <= 129 else (3.0 / (T - 1),):
        sum_error, grad_error = errors(dt)
        assert sum_error < 3e-7 and grad_error < 1.5e-6, (dt, sum_error, grad_error)


@triton.jit
def _sincos_kernel(angle_ptr, sin_ptr, cos_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    sin, cos = sincos(tl.load(angle_ptr + offsets, mask=mask, other=0.0))
    tl.store(sin_ptr + offsets, sin, mask=mask)
    tl.store(cos_ptr + offsets, cos, mask=mask)


@pytest.mark.parametrize("largest", [1.0, 30.0, 1e3, 1e5, 1e7])
def test_sincos_against_fp64(largest):
    """Absolute error about 1e-7 up to |angle| = 1e5, then at most the spacing of fp32 numbers at
    the angle (the fp32 angle itself is that uncertain)."""
    g = torch.Generator().manual_seed(11)
    angles = ((torch.rand(4099, generator=g, dtype=torch.float64) * 2 - 1) * largest).float()
    angles[:3] = torch.tensor([0.0, largest, -largest])
    on_device = angles.to(DEVICE)
    sin, cos = torch.empty_like(on_device), torch.empty_like(on_device)
    _sincos_kernel[(1,)](on_device, sin, cos, angles.numel(), BLOCK=8192)
    sin, cos = sin.cpu(), cos.cpu()
    exact = angles.double()
    error = torch.maximum((sin.double() - exact.sin()).abs(), (cos.double() - exact.cos()).abs())
    bound = 2e-7 if largest <= 1e5 else torch.maximum(
        torch.full_like(exact, 2e-7), torch.from_numpy(np.spacing(angles.abs().numpy())).double()
    )
    assert (error <= bound).all(), error.max()
