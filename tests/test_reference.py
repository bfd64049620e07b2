"""The oracle: the reference reproduces the seed's code and the formula evaluated in fp64."""

import math

import pytest
import torch

from lejepa_kernels.reference import EppsPulley, SlicedEppsPulley, quadrature, random_directions


def seed_epps_pulley(x, t, phi, weights):
    """The seed's single-process EppsPulley.forward, transcribed: x [N, S] -> [S]."""
    N = x.size(0)
    x_t = x.unsqueeze(-1) * t
    cos_mean = x_t.cos().mean(0)
    sin_mean = x_t.sin().mean(0)
    err = (cos_mean - phi).square() + sin_mean.square()
    return (err @ weights) * N * 1


def direct_fp64_loss(x, step, num_slices, t_max, n_points):
    """The SIGReg formula, written out in fp64 from the definitions, one slice at a time."""
    g = torch.Generator().manual_seed(step)
    A = torch.randn(x.shape[1], num_slices, generator=g).double()
    A = A / A.square().sum(0).sqrt()
    P = x.double() @ A
    N = x.shape[0]
    dt = t_max / (n_points - 1)
    total = 0.0
    for s in range(num_slices):
        stat = 0.0
        for k in range(n_points):
            tk = k * dt
            cm = torch.cos(tk * P[:, s]).mean()
            sm = torch.sin(tk * P[:, s]).mean()
            w = (dt if k in (0, n_points - 1) else 2 * dt) * math.exp(-tk * tk / 2)
            stat += w * ((cm - math.exp(-tk * tk / 2)) ** 2 + sm**2)
        total += N * stat
    return float(total) / num_slices


def test_quadrature_matches_seed_buffers():
    t, phi, weights = quadrature(2.5, 9)
    dt = 2.5 / 8
    torch.testing.assert_close(t, torch.linspace(0, 2.5, 9))
    torch.testing.assert_close(phi, torch.exp(-0.5 * t**2))
    expected = torch.full((9,), 2 * dt)
    expected[0] = expected[-1] = dt
    torch.testing.assert_close(weights, expected * phi)
    ep = EppsPulley(2.5, 9)
    assert set(ep.state_dict()) == {"t", "phi", "weights"}


def test_directions_are_the_seeds():
    A = random_directions(24, 19, step=5)
    g = torch.Generator().manual_seed(5)
    raw = torch.randn(24, 19, generator=g)
    torch.testing.assert_close(A, raw / raw.norm(dim=0), rtol=0, atol=0)
    torch.testing.assert_close(A.norm(dim=0), torch.ones(19))


@pytest.mark.parametrize("shape", [(37, 24, 19), (5, 3, 1), (64, 96, 257)])
def test_reference_reproduces_seed_code_exactly(shape):
    N, D, S = shape
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    module = SlicedEppsPulley(num_slices=S)
    for step in range(3):
        A = random_directions(D, S, step)
        expected = seed_epps_pulley(x @ A, module.ep.t, module.ep.phi, module.ep.weights).mean()
        assert module.global_step.item() == step
        torch.testing.assert_close(module(x), expected, rtol=0, atol=0)
    assert module.global_step.item() == 3


@pytest.mark.parametrize("t_max, n_points", [(3.0, 17), (2.0, 5), (4.0, 3)])
def test_reference_matches_direct_fp64_formula(t_max, n_points):
    x = torch.randn(37, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1.3
    module = SlicedEppsPulley(num_slices=7, t_max=t_max, n_points=n_points)
    module.global_step.fill_(11)
    loss = module(x)
    expected = direct_fp64_loss(x, 11, 7, t_max, n_points)
    # the module's grid is the seed's fp32 linspace: agreement to fp32 rounding of t
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_reference_rejects_even_n_points():
    with pytest.raises(ValueError, match="odd"):
        EppsPulley(n_points=16)
