"""`lejepa_kernels.compat.lightly.SIGReg` against lightly's formulas (fp64 transcription in
compat_standins): buffers, directions from the global generator, numbers, gradients, and the
gathered statistic under gloo with 2 ranks."""

import copy
import datetime
import os
import pickle

import compat_standins as lightly
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from compat_standins import lightly_directions, lightly_grid, lightly_loss
from conftest import CPU_BACKENDS

from lejepa_kernels.compat.lightly import SIGReg

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
SHAPES = {"[N, C]": (), "(3, N, C)": (3,), "(2, 2, N, C)": (2, 2)}
C, S, SEED = 10, 23, 7


def samples(shape, seed=0, dtype=torch.float64):
    """Normal samples of the given shape, scale 1.3 and shift 0.2, drawn in fp64, cast to dtype."""
    g = torch.Generator().manual_seed(seed)
    return (1.3 * torch.randn(*shape, generator=g, dtype=torch.float64) + 0.2).to(dtype)


def loss_grad_and_next_draw(fn, x):
    """(fn(x), dfn/dx, the global generator's next normal draw) at a detached copy of x."""
    x = x.detach().clone().requires_grad_()
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad, torch.randn(4)


@pytest.mark.parametrize("knots, t_max", [(17, 3.0), (8, 2.0), (2, 1.0), (33, 5.0)])
def test_buffers_are_lightlys(knots, t_max):
    ours, theirs = SIGReg(knots, t_max, S), lightly.SIGReg(knots, t_max, S)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["t", "phi", "weights"]
    for key, value in theirs.state_dict().items():
        assert ours.state_dict()[key].dtype == value.dtype
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0)
    assert (ours.num_vectors, ours.gather_distributed) == (S, False)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("lead", SHAPES.values(), ids=SHAPES.keys())
def test_numbers_and_gradients_against_fp64(lead, dtype):
    """Same global random state: lightly's directions (drawn and normalised in x's dtype), the
    same draws consumed, and the loss and gradient of the fp64 statistic on them."""
    x = samples((*lead, 31, C), dtype=dtype)
    torch.manual_seed(SEED)
    got, grad, next_draw = loss_grad_and_next_draw(SIGReg(num_vectors=S), x)
    torch.manual_seed(SEED)
    A = lightly_directions(C, S, x.device, dtype)
    want, want_grad, want_next_draw = loss_grad_and_next_draw(
        lambda z: lightly_loss(z, A.double(), *lightly_grid(17, 3.0)), x.double()
    )
    torch.testing.assert_close(next_draw, want_next_draw, rtol=0, atol=0)
    assert got.shape == () and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0)
    assert grad.dtype == dtype
    grad_tol = max(rtol, torch.finfo(dtype).eps)
    torch.testing.assert_close(grad.double(), want_grad, rtol=0, atol=grad_tol * want_grad.abs().max())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("knots, t_max", [(17, 3.0), (8, 2.0)])
def test_matches_lightlys_module_in_fp32(backend, knots, t_max):
    """The transcribed module in fp32 and ours, call after call from one global seed."""
    x = samples((2, 19, 5), dtype=torch.float32)
    ours, theirs = SIGReg(knots, t_max, 13, backend=backend), lightly.SIGReg(knots, t_max, 13)
    torch.manual_seed(SEED)
    got = [ours(x) for _ in range(3)]
    torch.manual_seed(SEED)
    want = [theirs(x) for _ in range(3)]
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-5, atol=0)
    assert len({value.item() for value in got}) == 3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"knots": 1}, ValueError, "knots"),
        ({"knots": 2.5}, ValueError, "knots"),
        ({"t_max": 0.0}, ValueError, "t_max"),
        ({"t_max": float("nan")}, ValueError, "t_max"),
        ({"num_vectors": 0}, ValueError, "num_vectors"),
        ({"gather_distributed": "yes"}, TypeError, "gather_distributed"),
        ({"backend": "gpu"}, ValueError, "backend"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SIGReg(**kwargs)


def test_bad_input():
    with pytest.raises(ValueError, match=r"\(\*, N, D\)"):
        SIGReg()(torch.randn(5))
    with pytest.raises(TypeError, match="floating"):
        SIGReg()(torch.ones(5, 4, dtype=torch.int64))


def test_module_pickles_and_deep_copies(tmp_path):
    module = SIGReg(9, 2.0, S)
    x = samples((20, C), dtype=torch.float32)
    path = tmp_path / "module.pt"
    torch.save(module, path)
    torch.manual_seed(SEED)
    expected = module(x)
    for other in (torch.load(path, weights_only=False), copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        torch.manual_seed(SEED)
        torch.testing.assert_close(other(x), expected, rtol=0, atol=0)
        other.load_state_dict(SIGReg(9, 4.0, S).state_dict())  # the loaded grid is used
        torch.manual_seed(SEED)
        got = other(x)
        torch.manual_seed(SEED)
        A = lightly_directions(C, S, x.device, x.dtype)
        want = lightly_loss(x.double(), A.double(), *lightly_grid(9, 4.0))
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=0)


# --- gather_distributed under gloo, 2 ranks ---------------------------------------------------

ROWS = (9, 4)  # unequal rows per rank


def _gloo_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        x = samples((2, sum(ROWS), C))
        start = sum(ROWS[:rank])
        results = {}
        for gather in (True, False):
            torch.manual_seed(100 + rank)  # rank 0's directions must win when gathering
            mine = x[:, start : start + ROWS[rank]].clone().requires_grad_()
            loss = SIGReg(num_vectors=S, gather_distributed=gather, backend="torch")(mine)
            loss.backward()
            results[gather] = (loss.detach(), mine.grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gather_distributed_gives_the_global_statistic(tmp_path):
    mp.spawn(_gloo_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    x = samples((2, sum(ROWS), C))
    grid = lightly_grid(17, 3.0)

    def oracle(seed, rows):
        torch.manual_seed(seed)
        A = lightly_directions(C, S, x.device, x.dtype)
        z = x[:, rows].clone().requires_grad_()
        loss = lightly_loss(z, A, *grid)
        loss.backward()
        return loss.detach(), z.grad

    want, want_grad = oracle(100, slice(None))  # rank 0's seed, the concatenated batch
    for rank in range(2):
        rows = slice(sum(ROWS[:rank]), sum(ROWS[: rank + 1]))
        loss, grad = results[rank][True]
        torch.testing.assert_close(loss, want, rtol=1e-9, atol=0)
        torch.testing.assert_close(grad, 2 * want_grad[:, rows], rtol=0, atol=1e-9 * want_grad.abs().max())
        local, local_grad = oracle(100 + rank, rows)  # without gathering: own seed, own rows
        torch.testing.assert_close(results[rank][False][0], local, rtol=1e-9, atol=0)
        torch.testing.assert_close(results[rank][False][1], local_grad, rtol=0, atol=1e-9 * local_grad.abs().max())
