"""The functional API refuses what it cannot compute, with an error that names the problem."""

import math

import pytest
import torch

from lejepa_kernels import ecf_sums, sliced_epps_pulley
from lejepa_kernels.reference import quadrature

T = quadrature(3.0, 5)[0]


@pytest.mark.parametrize(
    "x, A, error, match",
    [
        (torch.randn(0, 4), torch.randn(4, 8), ValueError, "at least 1 row"),
        (torch.randn(5, 4), torch.randn(4, 0), ValueError, "at least one column"),
        (torch.randn(5), torch.randn(5, 8), ValueError, r"\[N, D\] \(rows x features\) or \(\*, N, D\)"),
        (torch.randn(5, 4, dtype=torch.complex64), torch.randn(4, 8), TypeError, "floating dtype"),
        (torch.ones(5, 4, dtype=torch.int64), torch.randn(4, 8), TypeError, "floating dtype"),
        (torch.randn(5, 4), torch.ones(4, 8, dtype=torch.int64), TypeError, "floating dtype"),
        (torch.randn(5, 4), torch.randn(4, 8, dtype=torch.complex64), TypeError, "floating dtype"),
    ],
)
def test_ecf_sums_bad_tensors(x, A, error, match):
    with pytest.raises(error, match=match):
        ecf_sums(x, A, T)


@pytest.mark.parametrize("dt", [math.nan, math.inf, -0.5, "0.75", True])
def test_ecf_sums_bad_uniform_step(dt):
    with pytest.raises((ValueError, TypeError), match="dt"):
        ecf_sums(torch.randn(5, 4), torch.randn(4, 8), T, dt=dt)


def test_ecf_sums_bad_grid():
    with pytest.raises(TypeError, match="floating dtype"):
        ecf_sums(torch.randn(5, 4), torch.randn(4, 8), torch.arange(5))
    with pytest.raises(ValueError, match="at least one point"):
        ecf_sums(torch.randn(5, 4), torch.randn(4, 8), T[:0])


@pytest.mark.parametrize("step", [1.7, "3", 2.0, None, torch.tensor(1.5), torch.tensor([1, 2]), True])
def test_sliced_epps_pulley_bad_step(step):
    with pytest.raises((TypeError, ValueError), match="step"):
        sliced_epps_pulley(torch.randn(5, 4), step, 8)


@pytest.mark.parametrize("step", [3, torch.tensor(3), torch.tensor(3, dtype=torch.int32)])
def test_sliced_epps_pulley_integer_steps_agree(step):
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sliced_epps_pulley(x, step, 8), sliced_epps_pulley(x, 3, 8), rtol=0, atol=0)


@pytest.mark.parametrize("t_max", [1e300, 1e39, -1e300])
def test_huge_t_max_refused_up_front(t_max):
    with pytest.raises(ValueError, match="t_max"):
        sliced_epps_pulley(torch.randn(5, 4), 0, 8, t_max=t_max)
