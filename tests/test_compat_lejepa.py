"""`lejepa_kernels.compat.lejepa` against the official LeJEPA formulas (fp64 transcriptions in
compat_standins): buffers, state_dict, directions per step, reductions, clip_value, gradients."""

import copy
import pickle

import compat_standins as official
import pytest
import torch
from compat_standins import official_directions, official_grid, official_sliced, official_statistics
from conftest import CPU_BACKENDS

from lejepa_kernels.compat.lejepa import EppsPulley, SlicingUnivariateTest
from lejepa_kernels.reference import random_directions

D, S, STEP = 12, 19, 5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
SHAPES = {"[N, D]": (), "(2, N, D)": (2,), "(2, 3, N, D)": (2, 3)}


def samples(lead, n=37, d=D, seed=0, dtype=torch.float64):
    """(*lead, n, d): each group normal with its own scale and shift, cast to dtype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, d, generator=g, dtype=torch.float64)
    groups = x.view(-1, n, d)
    scale = torch.linspace(0.6, 1.8, groups.shape[0], dtype=torch.float64).view(-1, 1, 1)
    shift = torch.linspace(0.0, 0.9, groups.shape[0], dtype=torch.float64).view(-1, 1, 1)
    return (groups * scale + shift).view(x.shape).to(dtype)


def value_and_grad(fn, x, weights):
    """(fn(x), d sum(fn(x) * weights) / dx) at a detached copy of x."""
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    (out * weights).sum().backward()
    return out.detach(), x.grad


def assert_close_to_oracle(got, want, grad, want_grad, dtype):
    """Values within 2e-5 (1e-10 for fp64) of the fp64 oracle's scale; dx within one rounding of
    x's dtype more (dx is returned in x's dtype)."""
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    assert got.shape == want.shape and grad.shape == want_grad.shape and grad.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * want.abs().max())
    grad_tol = max(rtol, torch.finfo(dtype).eps)
    torch.testing.assert_close(grad.double(), want_grad, rtol=0, atol=grad_tol * want_grad.abs().max())


@pytest.mark.parametrize("t_max, n_points", [(3, 17), (2.5, 9), (5.0, 21)])
def test_buffers_and_state_dict_are_the_officials(t_max, n_points):
    ours = SlicingUnivariateTest(EppsPulley(t_max, n_points), S)
    theirs = official.SlicingUnivariateTest(official.EppsPulley(t_max, n_points), S)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == [
        "global_step", "univariate_test.t", "univariate_test.phi", "univariate_test.weights"
    ]
    for key, value in theirs.state_dict().items():
        assert ours.state_dict()[key].dtype == value.dtype
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0)
    assert ours.univariate_test.n_points == n_points and ours.univariate_test.integration == "trapezoid"
    assert (ours.num_slices, ours.reduction, ours.sampler, ours.clip_value) == (S, "mean", "gaussian", None)


def test_directions_are_the_officials():
    for step in (0, 5, 123456):
        torch.testing.assert_close(random_directions(D, S, step), official_directions(D, S, step), rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", None], ids=["mean", "sum", "None"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("lead", SHAPES.values(), ids=SHAPES.keys())
def test_numbers_and_gradients_against_fp64(lead, dtype, reduction):
    x = samples(lead, dtype=dtype)
    module = SlicingUnivariateTest(EppsPulley(), S, reduction=reduction)
    module.global_step.fill_(STEP)
    out_shape = (*lead, S) if reduction is None else ()
    weights = torch.randn(out_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got, grad = value_and_grad(module, x, weights.to(torch.float64 if dtype == torch.float64 else torch.float32))
    want, want_grad = value_and_grad(
        lambda z: official_sliced(z, STEP, S, official_grid(3, 17), reduction), x.double(), weights
    )
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_oracle(got, want, grad, want_grad, dtype)
    assert module.global_step.item() == STEP + 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_steps_match_the_official_module_in_fp32(backend):
    """Three calls from step 0, odd shapes and a 9-point grid: the transcribed official module
    in fp32 and ours agree to fp32 rounding, step by step (each step's own directions)."""
    x = samples((3,), n=23, d=7, dtype=torch.float32)
    ours = SlicingUnivariateTest(EppsPulley(2.5, 9), 11, backend=backend)
    theirs = official.SlicingUnivariateTest(official.EppsPulley(2.5, 9), 11)
    losses = []
    for _ in range(3):
        got, want = ours(x), theirs(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        losses.append(got.item())
    assert len(set(losses)) == 3 and ours.global_step.item() == theirs.global_step.item() == 3


@pytest.mark.parametrize("reduction", ["mean", None], ids=["mean", "None"])
def test_clip_value_zeroes_small_statistics(reduction):
    x = samples((2,), dtype=torch.float32)
    grid = official_grid(3, 17)
    stats = official_sliced(x.double(), STEP, S, grid, None)
    ordered = stats.flatten().sort().values
    middle = ordered.numel() // 2
    clip = (ordered[middle - 1] + ordered[middle]).item() / 2  # half are clipped, none close to it
    module = SlicingUnivariateTest(EppsPulley(), S, reduction=reduction, clip_value=clip)
    module.global_step.fill_(STEP)
    weights = torch.rand(stats.shape if reduction is None else (), generator=torch.Generator().manual_seed(2))
    got, grad = value_and_grad(module, x, weights)
    want, want_grad = value_and_grad(
        lambda z: official_sliced(z, STEP, S, grid, reduction, clip), x.double(), weights.double()
    )
    assert_close_to_oracle(got, want, grad, want_grad, torch.float32)
    if reduction is None:
        assert (got == 0).sum() == (stats < clip).sum() > 0


def test_univariate_epps_pulley_on_projections():
    proj = samples((2,), n=29, d=S, dtype=torch.float32)
    test = EppsPulley(2.0, 13)
    weights = torch.randn(2, S, generator=torch.Generator().manual_seed(3))
    got, grad = value_and_grad(test, proj, weights)
    want, want_grad = value_and_grad(
        lambda z: official_statistics(z, *official_grid(2.0, 13)), proj.double(), weights.double()
    )
    assert_close_to_oracle(got, want, grad, want_grad, torch.float32)


def test_state_dict_loads_both_ways():
    x = samples((), dtype=torch.float32)
    ours = SlicingUnivariateTest(EppsPulley(), S)
    theirs = official.SlicingUnivariateTest(official.EppsPulley(t_max=4.0, n_points=17), S)
    theirs(x), theirs(x)
    ours.load_state_dict(theirs.state_dict(), strict=True)  # their step and grid win
    assert ours.global_step.item() == 2
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=0)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=0)
    assert theirs.global_step.item() == ours.global_step.item() == 4


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: SlicingUnivariateTest(official.EppsPulley(), S), TypeError,
         r"lejepa_kernels\.compat\.lejepa\.EppsPulley.*got lejepa\.univariate\.epps_pulley\.EppsPulley"),
        (lambda: SlicingUnivariateTest(torch.nn.Identity(), S), TypeError, "the one univariate test"),
        (lambda: SlicingUnivariateTest(EppsPulley(), S, reduction="none"), ValueError, "reduction"),
        (lambda: SlicingUnivariateTest(EppsPulley(), S, sampler="sobol"), ValueError, "sampler.*gaussian"),
        (lambda: SlicingUnivariateTest(EppsPulley(), S, clip_value="0.1"), TypeError, "clip_value"),
        (lambda: SlicingUnivariateTest(EppsPulley(), 0), ValueError, "num_slices"),
        (lambda: SlicingUnivariateTest(EppsPulley(), S, backend="gpu"), ValueError, "backend"),
        (lambda: EppsPulley(integration="simpson"), ValueError, "integration.*trapezoid"),
        (lambda: EppsPulley(n_points=16), ValueError, "odd"),
        (lambda: EppsPulley(t_max=0), ValueError, "t_max"),
    ],
)
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_input_leaves_the_step_alone():
    module = SlicingUnivariateTest(EppsPulley(), S)
    for x, error in ((torch.randn(5), ValueError), (torch.ones(5, 4, dtype=torch.int64), TypeError)):
        with pytest.raises(error):
            module(x)
    assert module.global_step.item() == 0


def test_module_pickles_and_deep_copies(tmp_path):
    module = SlicingUnivariateTest(EppsPulley(2.0, 9), S, reduction="sum", clip_value=0.05)
    x = samples((), dtype=torch.float32)
    module(x)
    path = tmp_path / "module.pt"
    torch.save(module, path)
    expected = module(x)
    for other in (torch.load(path, weights_only=False), copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        other.global_step.fill_(1)
        other.resync_step()
        torch.testing.assert_close(other(x), expected, rtol=0, atol=0)
        other.load_state_dict(SlicingUnivariateTest(EppsPulley(2.0, 9), S).state_dict())
        assert other.global_step.item() == other._host_step.item() == 0  # the load hook survived
