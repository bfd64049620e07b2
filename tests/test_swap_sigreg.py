"""`swap_sigreg(model)`: recognition by class and module name (stand-ins from compat_standins),
the same losses and gradients after the swap, unchanged state_dict keys, checkpoints both ways."""

import copy

import compat_standins as other
import pytest
import torch
from torch import nn

from lejepa_kernels import FusedSlicedEppsPulley, swap_sigreg
from lejepa_kernels.compat import lejepa as compat_lejepa
from lejepa_kernels.compat import lightly as compat_lightly
from lejepa_kernels.reference import SlicedEppsPulley

D = 9


class Model(nn.Module):
    """A projector and SIGReg modules of every kind, some nested, one shared under two names."""

    def __init__(self):
        super().__init__()
        self.projector = nn.Linear(D, D)
        self.stable = other.SlicedEppsPulley(21, t_max=2.5, n_points=9)
        self.heads = nn.ModuleDict({
            "official": other.SlicingUnivariateTest(other.EppsPulley(3, 17), 17, reduction="sum", clip_value=0.3),
            "lightly": other.SIGReg(knots=8, t_max=2.0, num_vectors=15),
        })
        self.shared = other.SlicingUnivariateTest(other.EppsPulley(2, 11), 13, reduction=None)
        self.same_shared = self.shared
        self.ours = FusedSlicedEppsPulley(11)
        self.seed_here = SlicedEppsPulley(11)  # class SlicedEppsPulley, not from stable_pretraining
        self.moments = other.SlicingUnivariateTest(other.Moments(), 11)  # not an Epps-Pulley test

    def forward(self, x):
        z = self.projector(x)
        torch.manual_seed(0)  # lightly's directions come from the global generator
        return {
            "stable": self.stable(z),
            "official": self.heads["official"](z),
            "lightly": self.heads["lightly"](z),
            "shared": self.shared(z).sum(),
            "ours": self.ours(z),
            "seed_here": self.seed_here(z),
            "moments": self.moments(z),
        }


def _advanced(model):
    """The model after two calls (nonzero steps) and with one module in eval mode."""
    x = torch.randn(2, 30, D, generator=torch.Generator().manual_seed(1))
    model(x), model(x)
    model.heads["lightly"].eval()
    return model


def test_swaps_every_sigreg_and_only_those():
    torch.manual_seed(0)
    model = _advanced(Model())
    kept = {name: getattr(model, name) for name in ("projector", "ours", "seed_here", "moments")}
    assert swap_sigreg(model) == 4  # the shared module counts once
    assert type(model.stable) is FusedSlicedEppsPulley
    assert type(model.heads["official"]) is compat_lejepa.SlicingUnivariateTest
    assert type(model.heads["official"].univariate_test) is compat_lejepa.EppsPulley
    assert type(model.heads["lightly"]) is compat_lightly.SIGReg
    assert model.shared is model.same_shared and type(model.shared) is compat_lejepa.SlicingUnivariateTest
    for name, module in kept.items():
        assert getattr(model, name) is module
    official = model.heads["official"]
    assert (official.num_slices, official.reduction, official.clip_value) == (17, "sum", 0.3)
    assert model.shared.reduction is None
    assert not model.heads["lightly"].training and model.stable.training
    assert swap_sigreg(model) == 0  # nothing left to swap


def test_same_losses_gradients_and_state_after_the_swap():
    torch.manual_seed(0)
    original = _advanced(Model())
    swapped = copy.deepcopy(original)
    keys = list(original.state_dict())
    swap_sigreg(swapped)
    assert list(swapped.state_dict()) == keys
    for key, value in original.state_dict().items():
        torch.testing.assert_close(swapped.state_dict()[key], value, rtol=0, atol=0)
    x = torch.randn(3, 25, D, generator=torch.Generator().manual_seed(2))
    for step in range(2):
        losses = [model(x) for model in (original, swapped)]
        for name, loss in losses[0].items():
            torch.testing.assert_close(losses[1][name], loss, rtol=2e-5, atol=0, msg=f"step {step}: {name}")
        grads = []
        for model, loss in zip((original, swapped), losses):
            model.zero_grad()
            sum(loss.values()).backward()
            grads.append(model.projector.weight.grad.clone())
        torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=2e-5 * grads[0].abs().max())
    original.load_state_dict(swapped.state_dict(), strict=True)  # checkpoints load both ways
    swapped.load_state_dict(original.state_dict(), strict=True)
    assert swapped.stable.global_step.item() == original.stable.global_step.item() == 4


def test_keeps_device_and_grid_dtype():
    model = nn.Sequential(other.SlicedEppsPulley(7, n_points=5)).double()
    model[0].global_step.fill_(3)
    x = torch.randn(20, 4, dtype=torch.float64)
    want = copy.deepcopy(model)(x)
    assert swap_sigreg(model) == 1
    assert model[0].ep.t.dtype == torch.float64 and model[0].global_step.item() == 3
    torch.testing.assert_close(model(x), want, rtol=1e-10, atol=0)


def test_bad_models():
    with pytest.raises(TypeError, match="nn.Module"):
        swap_sigreg("model")
    with pytest.raises(ValueError, match="itself a SlicedEppsPulley"):
        swap_sigreg(other.SlicedEppsPulley(8))
    plain = nn.Sequential(nn.Linear(3, 3), FusedSlicedEppsPulley(8))
    children = list(plain.children())
    assert swap_sigreg(plain) == 0 and list(plain.children()) == children


def test_an_unsupported_setting_swaps_nothing():
    """An official module whose sampler we do not have: the error says so, the model is unchanged."""
    model = nn.ModuleDict({
        "a": other.SlicedEppsPulley(8),
        "b": other.SlicingUnivariateTest(other.EppsPulley(), 8, sampler="sobol"),
    })
    before = dict(model.items())
    with pytest.raises(ValueError, match="sampler"):
        swap_sigreg(model)
    assert dict(model.items()) == before
