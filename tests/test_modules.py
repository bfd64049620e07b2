"""The drop-in module: state_dict interchange, backends, torch.compile, and bad input."""

import copy
import os
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE, embeddings, loss_and_grad

from lejepa_kernels import FusedSlicedEppsPulley, ecf_sums, sliced_epps_pulley
from lejepa_kernels.reference import SlicedEppsPulley, quadrature


def test_state_dict_interchange_both_ways():
    seed, fused = SlicedEppsPulley(31, t_max=2.5, n_points=9), FusedSlicedEppsPulley(31, t_max=2.5, n_points=9)
    assert list(seed.state_dict()) == list(fused.state_dict())
    for key, value in seed.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, rtol=0, atol=0)
    x = torch.randn(40, 16)
    seed(x), seed(x)
    fused.load_state_dict(seed.state_dict(), strict=True)
    assert fused.global_step.item() == 2
    torch.testing.assert_close(fused(x), seed(x), rtol=1e-5, atol=0)
    seed.load_state_dict(fused.state_dict(), strict=True)
    assert seed.global_step.item() == 3
    torch.testing.assert_close(seed(x), fused(x), rtol=1e-5, atol=0)


def test_compiled_fullgraph_matches_eager_over_steps():
    x = torch.randn(50, 24, generator=torch.Generator().manual_seed(0))
    compiled_module = FusedSlicedEppsPulley(64)
    eager_module = FusedSlicedEppsPulley(64)
    compiled = torch.compile(compiled_module, fullgraph=True)
    for step in range(3):
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss_c, loss_e = compiled(xc), eager_module(xe)
        loss_c.backward(), loss_e.backward()
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-8)
        assert compiled_module.global_step.item() == step + 1
    reference = SlicedEppsPulley(64)
    reference.global_step.fill_(2)
    torch.testing.assert_close(loss_c, reference(x), rtol=1e-5, atol=0)


def test_triton_backend_on_cpu_tensors_outside_the_interpreter():
    script = (
        "import torch, lejepa_kernels as lk\n"
        "try:\n"
        "    lk.FusedSlicedEppsPulley(8, backend='triton')(torch.randn(5, 4))\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert "needs CUDA tensors" in result.stdout and "TRITON_INTERPRET" in result.stdout, result


@pytest.mark.parametrize("chosen", ["torch", "triton"])
def test_environment_overrides_auto(monkeypatch, chosen):
    x = torch.randn(5, 4, device=DEVICE)
    expected = FusedSlicedEppsPulley(8, backend=chosen).to(DEVICE)(x)
    monkeypatch.setenv("LEJEPA_KERNELS_BACKEND", chosen)
    torch.testing.assert_close(FusedSlicedEppsPulley(8).to(DEVICE)(x), expected, rtol=0, atol=0)
    monkeypatch.setenv("LEJEPA_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="LEJEPA_KERNELS_BACKEND"):
        FusedSlicedEppsPulley(8)(x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_points": 16}, "odd"),
        ({"n_points": 1}, ">= 3"),
        ({"t_max": 0.0}, "t_max"),
        ({"t_max": -1.0}, "t_max"),
        ({"t_max": float("inf")}, "t_max"),
        ({"num_slices": 0}, "num_slices"),
        ({"num_slices": 2.5}, "num_slices"),
        ({"backend": "cuda"}, "backend"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedSlicedEppsPulley(**kwargs)
    if "backend" not in kwargs:
        with pytest.raises(ValueError, match=match):
            sliced_epps_pulley(torch.randn(5, 4), 0, **kwargs)


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.randn(5), ValueError, r"\[N, D\] \(rows x features\) or \(\*, N, D\)"),
        (torch.randn(2, 1, 4), ValueError, "at least 2 rows per group"),
        (torch.randn(0, 3, 4), ValueError, "at least one group"),
        (torch.randn(1, 4), ValueError, "at least 2 rows"),
        (torch.randn(0, 4), ValueError, "at least 2 rows"),
        (torch.randn(5, 0), ValueError, "feature"),
        (torch.ones(5, 4, dtype=torch.int64), TypeError, "floating dtype"),
        (torch.randn(5, 4, dtype=torch.complex64), TypeError, "floating dtype"),
        ([[1.0, 2.0], [3.0, 4.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_embeddings(x, error, match):
    module = FusedSlicedEppsPulley(8)
    with pytest.raises(error, match=match):
        module(x)
    assert module.global_step.item() == 0


def test_ecf_sums_bad_arguments():
    x, t = torch.randn(5, 4), quadrature(3.0, 5)[0]
    with pytest.raises(ValueError, match=r"\[D, S\]"):
        ecf_sums(x, torch.randn(3, 8), t)
    with pytest.raises(ValueError, match="1-D"):
        ecf_sums(x, torch.randn(4, 8), t[None])
    with pytest.raises(ValueError, match="no gradient"):
        ecf_sums(x, torch.randn(4, 8, requires_grad=True), t)
    with pytest.raises(ValueError, match="one device"):
        ecf_sums(x, torch.randn(4, 8, device="meta"), t)


def test_host_step_copy_follows_the_buffer(monkeypatch):
    """The GPU path samples from the host copy: force it on CPU, eager and compiled."""
    from lejepa_kernels import modules

    monkeypatch.setattr(modules, "step_is_on_host", lambda step: False)
    x = torch.randn(40, 16)
    fused, oracle = FusedSlicedEppsPulley(23), SlicedEppsPulley(23)
    compiled = torch.compile(fused, fullgraph=True)
    for call in (fused, compiled, fused):
        torch.testing.assert_close(call(x), oracle(x), rtol=1e-5, atol=0)
    assert fused.global_step.item() == fused._host_step.item() == 3
    oracle.global_step.fill_(9)
    fused.load_state_dict(oracle.state_dict())
    assert fused._host_step.item() == 9
    torch.testing.assert_close(fused(x), oracle(x), rtol=1e-5, atol=0)
    fused.global_step.fill_(2)
    oracle.global_step.fill_(2)
    fused.resync_step()
    torch.testing.assert_close(fused(x), oracle(x), rtol=1e-5, atol=0)


@pytest.mark.parametrize("saved_t_max, saved_points", [(5.0, 17), (1.5, 9)])
def test_loaded_grid_gives_the_seeds_numbers(saved_t_max, saved_points):
    """A checkpoint's grid (t, phi, weights) wins over the constructor's, as in the seed."""
    x = embeddings(45, 12, torch.float32)
    saved = SlicedEppsPulley(29, t_max=saved_t_max, n_points=saved_points).state_dict()
    seed, fused = SlicedEppsPulley(29, n_points=saved_points), FusedSlicedEppsPulley(29, n_points=saved_points)
    seed.load_state_dict(saved)
    fused.load_state_dict(saved)
    loss, grad = loss_and_grad(fused, x)
    ref_loss, ref_grad = loss_and_grad(seed, x.double())
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-4 * ref_grad.abs().max())


def test_grid_edited_in_place_gives_the_seeds_numbers():
    x = embeddings(45, 12, torch.float32)
    seed, fused = SlicedEppsPulley(29), FusedSlicedEppsPulley(29)
    seed(x), fused(x)  # the grid as constructed has been used once
    seed.global_step.zero_()
    fused.global_step.zero_()
    fused.resync_step()
    for edit in (lambda t: t.mul_(2.0), lambda t: t.copy_(torch.linspace(0, 1, t.numel()) ** 2)):
        for module in (seed, fused):
            edit(module.ep.t)
        loss, grad = loss_and_grad(fused, x)
        ref_loss, ref_grad = loss_and_grad(seed, x.double())
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-4 * ref_grad.abs().max())


def _state(module):
    return {key: value.clone() for key, value in module.state_dict().items()}


def test_module_pickles_and_deep_copies(tmp_path):
    module = FusedSlicedEppsPulley(19, t_max=2.0, n_points=9)
    x = embeddings(30, 8, torch.float32)
    module(x)
    path = tmp_path / "module.pt"
    torch.save(module, path)
    loaded = torch.load(path, weights_only=False)
    copied = copy.deepcopy(module)
    expected = module(x)
    for other in (loaded, copied):
        assert other.global_step.item() == 1
        torch.testing.assert_close(other(x), expected, rtol=0, atol=0)
        other.load_state_dict(_state(SlicedEppsPulley(19, t_max=2.0, n_points=9)))
        assert other.global_step.item() == 0  # the load hook survived the copy
    assert pickle.loads(pickle.dumps(module)).global_step.item() == 2
