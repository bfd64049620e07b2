"""Transcriptions of the other SIGReg APIs' formulas: the fp64 oracles of the compat tests, and
stand-in classes that carry the real class and module names (for `swap_sigreg`).

Transcribed (not copied) from:
- the official LeJEPA package, github.com/rbalestr-lab/lejepa: lejepa/univariate/epps_pulley.py
  (`EppsPulley`) and lejepa/multivariate/slicing.py (`SlicingUnivariateTest`);
- lightly, github.com/lightly-ai/lightly: lightly/loss/lejepa_loss.py (`SIGReg`);
- stable-pretraining's `SlicedEppsPulley`: the seed, `lejepa_kernels.reference.SlicedEppsPulley`.

Single process only (no all-reduce). Where the originals multiply an fp32 buffer or direction
matrix with x of another dtype (which they would refuse in a matmul), the stand-ins cast it to
x's dtype, so that they also run in fp64 as oracles.
"""

import torch
from torch import nn

from lejepa_kernels import reference


def _named(module_name):
    """Give a class the module name of the package it stands in for."""

    def rename(cls):
        cls.__module__ = module_name
        return cls

    return rename


# --- the official LeJEPA package -------------------------------------------------------------


def official_grid(t_max, n_points):
    """EppsPulley's buffers (t, phi, weights), fp32 [n_points]."""
    t = torch.linspace(0, t_max, n_points, dtype=torch.float32)
    dt = t_max / (n_points - 1)
    weights = torch.full((n_points,), 2 * dt, dtype=torch.float32)
    weights[[0, -1]] = dt
    phi = t.square().mul_(0.5).neg_().exp_()
    return t, phi, weights * phi


def official_directions(dim, num_slices, step, device="cpu"):
    """SlicingUnivariateTest's directions for a step: randn from a generator on the device
    seeded with the step, each column divided in place by its L2 norm; [dim, num_slices]."""
    g = torch.Generator(device=device).manual_seed(int(step))
    A = torch.randn((dim, num_slices), device=device, generator=g)
    A /= A.norm(p=2, dim=0)
    return A


def official_statistics(proj, t, phi, weights):
    """EppsPulley on projections (*, N, K): N * sum_k w_k ((mean cos - phi)^2 + mean sin^2), (*, K)."""
    n = proj.size(-2)
    x_t = proj.unsqueeze(-1) * t.to(proj.dtype)
    cos_mean, sin_mean = x_t.cos().mean(-3), x_t.sin().mean(-3)
    err = (cos_mean - phi.to(proj.dtype)).square() + sin_mean.square()
    return (err @ weights.to(err.dtype)) * n


def official_sliced(x, step, num_slices, grid, reduction="mean", clip_value=None):
    """SlicingUnivariateTest(EppsPulley) at a step, in x's dtype."""
    A = official_directions(x.size(-1), num_slices, step, x.device).to(x.dtype)
    stats = official_statistics(x @ A, *grid)
    if clip_value is not None:
        stats = stats.clone()
        stats[stats < clip_value] = 0
    return {"mean": stats.mean, "sum": stats.sum, None: lambda: stats}[reduction]()


@_named("lejepa.univariate.epps_pulley")
class EppsPulley(nn.Module):
    def __init__(self, t_max=3, n_points=17, integration="trapezoid"):
        super().__init__()
        self.integration, self.n_points = integration, n_points
        t, phi, weights = official_grid(t_max, n_points)
        self.register_buffer("t", t)
        self.register_buffer("phi", phi)
        self.register_buffer("weights", weights)

    def forward(self, x):
        return official_statistics(x, self.t, self.phi, self.weights)


@_named("lejepa.multivariate.slicing")
class SlicingUnivariateTest(nn.Module):
    def __init__(self, univariate_test, num_slices, reduction="mean", sampler="gaussian", clip_value=None):
        super().__init__()
        self.reduction, self.num_slices, self.sampler = reduction, num_slices, sampler
        self.univariate_test, self.clip_value = univariate_test, clip_value
        self.register_buffer("global_step", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        with torch.no_grad():
            A = official_directions(x.size(-1), self.num_slices, self.global_step.item(), x.device)
            self.global_step.add_(1)
        stats = self.univariate_test(x @ A.to(x.dtype))
        if self.clip_value is not None:
            stats[stats < self.clip_value] = 0
        return {"mean": stats.mean, "sum": stats.sum, None: lambda: stats}[self.reduction]()


@_named("lejepa.univariate.moments")
class Moments(nn.Module):
    """Another official univariate test (not Epps-Pulley): swap_sigreg leaves it alone."""

    def forward(self, x):
        return x.mean(-2).square() + (x.var(-2) - 1).square()


# --- lightly ---------------------------------------------------------------------------------


def lightly_grid(knots, t_max):
    """SIGReg's buffers (t, phi, weights), fp32 [knots]."""
    t = torch.linspace(0, t_max, knots, dtype=torch.float32)
    dt = t_max / (knots - 1)
    weights = torch.full((knots,), 2 * dt, dtype=torch.float32)
    weights[[0, -1]] = dt
    window = torch.exp(-t.square() / 2.0)
    return t, window, weights * window


def lightly_directions(num_features, num_vectors, device, dtype):
    """SIGReg's directions: randn in `dtype` from the global generator, normalised in place."""
    A = torch.randn(num_features, num_vectors, device=device, dtype=dtype)
    return A.div_(A.norm(p=2, dim=0))


def lightly_loss(proj, A, t, phi, weights):
    """SIGReg on (..., N, C) given its directions, in proj's dtype (A cast to it): the mean over
    groups and directions of N * sum_k w_k ((sum cos / N - phi)^2 + (sum sin / N)^2)."""
    n = proj.size(-2)
    x_t = (proj @ A.to(proj.dtype)).unsqueeze(-1) * t.to(proj.dtype)
    cos_mean, sin_mean = x_t.cos().sum(-3) / n, x_t.sin().sum(-3) / n
    err = (cos_mean - phi.to(x_t.dtype)).square() + sin_mean.square()
    return ((err @ weights.to(err.dtype)) * n).mean()


@_named("lightly.loss.lejepa_loss")
class SIGReg(nn.Module):
    def __init__(self, knots=17, t_max=3.0, num_vectors=1024, gather_distributed=False):
        super().__init__()
        self.num_vectors, self.gather_distributed = num_vectors, gather_distributed
        t, phi, weights = lightly_grid(knots, t_max)
        self.register_buffer("t", t)
        self.register_buffer("phi", phi)
        self.register_buffer("weights", weights)

    def forward(self, proj):
        A = lightly_directions(proj.size(-1), self.num_vectors, proj.device, proj.dtype)
        return lightly_loss(proj, A, self.t, self.phi, self.weights)


# --- stable-pretraining ----------------------------------------------------------------------


@_named("stable_pretraining.methods.lejepa")
class SlicedEppsPulley(reference.SlicedEppsPulley):
    """stable-pretraining's SlicedEppsPulley (the seed, as `reference` transcribes it)."""
