"""SIGReg under torch.distributed: gloo processes on the CPU (torch.multiprocessing.spawn).

Each world size is spawned once: its workers run every check (unequal per-rank batches, several
steps) and save what they computed; the tests compare that with the single-process oracle on the
concatenated batch. Rank r's gradient must be W times the single-process gradient of its rows.
"""

import datetime
import itertools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import grouped_oracle, has_c_compiler, loss_and_grad

from lejepa_kernels import FusedSlicedEppsPulley, sliced_epps_pulley
from lejepa_kernels.lejepa import LeJEPA
from lejepa_kernels.reference import SlicedEppsPulley, random_directions

ROWS = {2: (7, 1), 3: (5, 9, 2)}  # rows per rank: unequal, and a rank may hold a single row
D, S, T_MAX, N_POINTS = 6, 16, 3.0, 9
STEPS = 3
FIRST_STEP = 4  # rank 0's step before the first call; the other ranks start elsewhere
RELOAD_STEP = 50  # rank 0's step loaded by load_state_dict after STEPS calls
FUNCTIONAL_STEP = 11
LOCAL_STEP = 20  # + rank: under distributed=False each rank keeps its own step
GROUP_STEP = 7  # the process group's rank 0 step (the other member starts at 3)
DDP_BATCH, DDP_VIEWS, DDP_GLOBAL_VIEWS, DDP_WIDTH, LAMB = 3, 4, 2, 8, 0.5
RTOL = 1e-9  # fp64 PyTorch path
TRITON_RTOL = 2e-4  # fp32 Triton kernels (interpreter) against the fp64 oracle
GROUPS = (2, 3)  # leading dimensions of the grouped input: 6 groups
GROUPED_BACKENDS = ("torch", "cpu") if has_c_compiler() else ("torch",)


def _inputs(world: int) -> dict:
    """Every step's concatenated batch [N, D] fp64 and the DDP views [V, W*B, D]."""
    g = torch.Generator().manual_seed(world)
    n = sum(ROWS[world])
    return {
        "x": [torch.randn(n, D, generator=g, dtype=torch.float64) for _ in range(STEPS + 1)],
        "views": [
            torch.randn(DDP_VIEWS, world * DDP_BATCH, D, generator=g, dtype=torch.float64)
            for _ in range(2)
        ],
        "groups": torch.randn(*GROUPS, n, D, generator=g, dtype=torch.float64)
        * torch.linspace(0.5, 2.0, 6, dtype=torch.float64).view(*GROUPS, 1, 1),
        "group_weights": torch.randn(*GROUPS, S, generator=g, dtype=torch.float64),
    }


def _rows(world: int, rank: int) -> slice:
    start = sum(ROWS[world][:rank])
    return slice(start, start + ROWS[world][rank])


def _group_members(world: int) -> list[int]:
    """The ranks of the test's process group: all of them for 2, a subset (1, 2) for 3."""
    return list(range(world))[-2:]


class _TinyLeJEPA(torch.nn.Module):
    """A linear projector and a SIGReg module: views [V, B, D] -> (loss, inv_loss, sigreg_loss)."""

    def __init__(self, sigreg: torch.nn.Module, sigreg_views: str = "concat"):
        super().__init__()
        torch.manual_seed(0)
        self.projector = torch.nn.Linear(D, DDP_WIDTH).double()
        self.sigreg = sigreg
        self.sigreg_views = sigreg_views

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return LeJEPA._compute_loss(self.projector(views), DDP_GLOBAL_VIEWS, self.sigreg, LAMB, self.sigreg_views)


def _steps(module, xs: list[torch.Tensor]) -> list[dict]:
    """Call module on each x; record loss, x.grad and global_step after the call."""
    out = []
    for x in xs:
        loss, grad = loss_and_grad(module, x)
        out.append({"loss": loss, "grad": grad, "step_after": int(module.global_step)})
    return out


def _ddp_grads(model: torch.nn.Module, views: list[torch.Tensor]) -> list[dict]:
    """SGD steps on a (DDP-wrapped) _TinyLeJEPA: each step's parameter gradients and SIGReg."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for v in views:
        loss, _, sigreg_loss = model(v)
        optimizer.zero_grad()
        loss.backward()
        grads = {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters()}
        out.append({"grads": grads, "sigreg": sigreg_loss.detach()})
        optimizer.step()
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (at the first kernel launch)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        data = _inputs(world)
        xs = [x[_rows(world, rank)] for x in data["x"]]
        results = {}

        def other_ranks_drift(module):
            module.global_step.fill_(FIRST_STEP if rank == 0 else 100 + rank)
            return module

        module = other_ranks_drift(FusedSlicedEppsPulley(S, T_MAX, N_POINTS, backend="torch"))
        results["fused"] = _steps(module, xs[:STEPS])
        reloaded = {**module.state_dict(), "global_step": torch.tensor(RELOAD_STEP + rank)}
        module.load_state_dict(reloaded)
        results["fused"] += _steps(module, xs[STEPS:])

        reference = other_ranks_drift(SlicedEppsPulley(S, T_MAX, N_POINTS))
        results["reference"] = _steps(reference, xs[:STEPS])

        triton = other_ranks_drift(FusedSlicedEppsPulley(S, T_MAX, N_POINTS, backend="triton"))
        results["triton"] = _steps(triton, [x.float() for x in xs[:STEPS]])

        def functional(**kwargs):
            return lambda x: sliced_epps_pulley(
                x, FUNCTIONAL_STEP, S, T_MAX, N_POINTS, backend="torch", **kwargs
            )

        results["functional"] = loss_and_grad(functional(), xs[0])
        local = FusedSlicedEppsPulley(S, T_MAX, N_POINTS, backend="torch", distributed=False)
        local.global_step.fill_(LOCAL_STEP + rank)
        try:
            results["local"] = _steps(local, xs[:STEPS])
            results["functional_local"] = loss_and_grad(functional(distributed=False), xs[0])
        except ValueError as error:
            results["local"] = str(error)

        members = _group_members(world)
        group = dist.new_group(members)
        if rank in members:
            grouped = FusedSlicedEppsPulley(
                S, T_MAX, N_POINTS, backend="torch", process_group=group
            )
            grouped.global_step.fill_(GROUP_STEP if rank == members[0] else 3)
            results["group"] = _steps(grouped, xs[:STEPS])

        sigreg = FusedSlicedEppsPulley(S, T_MAX, N_POINTS, backend="torch")
        ddp = torch.nn.parallel.DistributedDataParallel(_TinyLeJEPA(sigreg))
        batch = slice(rank * DDP_BATCH, (rank + 1) * DDP_BATCH)
        results["ddp"] = _ddp_grads(ddp, [v[:, batch] for v in data["views"]])

        per_view = _TinyLeJEPA(FusedSlicedEppsPulley(S, T_MAX, N_POINTS, backend="torch"), "per_view")
        results["ddp_per_view"] = _ddp_grads(
            torch.nn.parallel.DistributedDataParallel(per_view), [v[:, batch] for v in data["views"]]
        )

        rows = _rows(world, rank)
        for backend, unbiased in itertools.product(GROUPED_BACKENDS, (False, True)):
            x = data["groups"][..., rows, :]
            x = x if backend == "torch" else x.float()
            x.requires_grad_()
            stats = sliced_epps_pulley(x, FUNCTIONAL_STEP, S, T_MAX, N_POINTS, backend,
                                       reduction="none", unbiased=unbiased)
            (stats * data["group_weights"].to(stats.dtype)).sum().backward()
            results[f"grouped {backend} {unbiased}"] = (stats.detach(), x.grad)

        if world == 2:
            module = other_ranks_drift(FusedSlicedEppsPulley(S, T_MAX, N_POINTS, backend="torch"))
            compiled = torch.compile(module, fullgraph=True)
            results["compiled"] = _steps(compiled, xs[:STEPS])

        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda world: f"world{world}")
def spawned(request, tmp_path_factory) -> tuple[int, list[dict]]:
    """(world size, each rank's results) from one spawn of gloo workers."""
    world = request.param
    out = tmp_path_factory.mktemp(f"world{world}")
    mp.spawn(_worker, args=(world, str(out / "init"), str(out)), nprocs=world, join=True)
    return world, [torch.load(out / f"rank{rank}.pt") for rank in range(world)]


def _oracle(x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The single-process reference loss and gradient of x at step."""
    module = SlicedEppsPulley(S, T_MAX, N_POINTS)
    module.global_step.fill_(step)
    return loss_and_grad(module, x)


def _assert_close(got: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=rtol * expected.abs().max())


def _check_global(
    world: int,
    results: list[dict],
    key: str,
    steps: list[int],
    rtol: float = RTOL,
    *,
    lockstep: bool = True,
) -> None:
    """Every rank's loss is the oracle's on the concatenated batch, its gradient W times its
    rows'; with lockstep, every rank's global_step has become rank 0's."""
    x = _inputs(world)["x"]
    for i, step in enumerate(steps):
        loss, grad = _oracle(x[i], step)
        for rank, result in enumerate(results):
            got = result[key][i]
            _assert_close(got["loss"], loss, rtol)
            _assert_close(got["grad"], world * grad[_rows(world, rank)], rtol)
            assert got["step_after"] == step + 1 or not lockstep


def test_loss_and_gradients_are_global(spawned):
    world, results = spawned
    _check_global(world, results, "fused", [FIRST_STEP + i for i in range(STEPS)] + [RELOAD_STEP])


def test_reference_module_is_global_too(spawned):
    """Like the seed, it broadcasts a copy of the step every call and leaves each buffer as is."""
    world, results = spawned
    steps = [FIRST_STEP + i for i in range(STEPS)]
    _check_global(world, results, "reference", steps, lockstep=False)


def test_triton_kernels_are_global(spawned):
    world, results = spawned
    _check_global(world, results, "triton", [FIRST_STEP + i for i in range(STEPS)], TRITON_RTOL)
    assert results[0]["triton"][0]["loss"].dtype == torch.float32


def test_functional_is_global(spawned):
    world, results = spawned
    loss, grad = _oracle(_inputs(world)["x"][0], FUNCTIONAL_STEP)
    for rank, result in enumerate(results):
        _assert_close(result["functional"][0], loss, RTOL)
        _assert_close(result["functional"][1], world * grad[_rows(world, rank)], RTOL)


def test_distributed_false_is_local(spawned):
    world, results = spawned
    x = _inputs(world)["x"]
    for rank, result in enumerate(results):
        if ROWS[world][rank] < 2:
            assert "at least 2 rows" in result["local"]
            continue
        for i in range(STEPS):
            loss, grad = _oracle(x[i][_rows(world, rank)], LOCAL_STEP + rank + i)
            _assert_close(result["local"][i]["loss"], loss, RTOL)
            _assert_close(result["local"][i]["grad"], grad, RTOL)
        loss, grad = _oracle(x[0][_rows(world, rank)], FUNCTIONAL_STEP)
        _assert_close(result["functional_local"][0], loss, RTOL)
        _assert_close(result["functional_local"][1], grad, RTOL)


def test_process_group_is_honoured(spawned):
    """The group's ranks share their sums and their rank 0's step; the others take no part."""
    world, results = spawned
    members = _group_members(world)
    x = _inputs(world)["x"]
    for i in range(STEPS):
        batch = torch.cat([x[i][_rows(world, rank)] for rank in members])
        loss, grad = _oracle(batch, GROUP_STEP + i)
        start = 0
        for rank in members:
            got, n = results[rank]["group"][i], ROWS[world][rank]
            _assert_close(got["loss"], loss, RTOL)
            _assert_close(got["grad"], len(members) * grad[start : start + n], RTOL)
            assert got["step_after"] == GROUP_STEP + i + 1
            start += n
    assert all("group" not in results[rank] for rank in range(world) if rank not in members)


def test_ddp_parameter_gradients_are_full_batch(spawned):
    """DDP around a projector with the LeJEPA loss: the single-process full-batch gradients."""
    world, results = spawned
    model = _TinyLeJEPA(SlicedEppsPulley(S, T_MAX, N_POINTS))
    expected = _ddp_grads(model, _inputs(world)["views"])
    for result in results:
        for got, want in zip(result["ddp"], expected):
            _assert_close(got["sigreg"], want["sigreg"], RTOL)
            for name, grad in want["grads"].items():
                _assert_close(got["grads"][name], grad, RTOL)


def test_compiled_fullgraph_under_gloo(spawned):
    world, results = spawned
    if world != 2:
        pytest.skip("compiled once, with two ranks")
    _check_global(world, results, "compiled", [FIRST_STEP + i for i in range(STEPS)], 1e-8)


def test_ddp_per_view_sigreg_gives_full_batch_gradients(spawned):
    """sigreg_views="per_view" under DDP: each view's statistic on the global batch."""
    world, results = spawned
    model = _TinyLeJEPA(SlicedEppsPulley(S, T_MAX, N_POINTS), "per_view")
    expected = _ddp_grads(model, _inputs(world)["views"])
    for result in results:
        for got, want in zip(result["ddp_per_view"], expected):
            _assert_close(got["sigreg"], want["sigreg"], RTOL)
            for name, grad in want["grads"].items():
                _assert_close(got["grads"][name], grad, RTOL)


@pytest.mark.parametrize("unbiased", [False, True], ids=["plug-in", "unbiased"])
@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
def test_grouped_statistics_are_global(spawned, backend, unbiased):
    """x (2, 3, N_r, D), unequal rows per rank: every group's statistics are the fp64 oracle's on
    the concatenated rows (N the group's total), rank r's gradient W times its rows' (one
    all-reduce of every group's sums and counts)."""
    world, results = spawned
    data = _inputs(world)
    x = data["groups"].clone().requires_grad_()
    A = random_directions(D, S, FUNCTIONAL_STEP)
    want = grouped_oracle(x, A, T_MAX, N_POINTS, unbiased)
    (want * data["group_weights"]).sum().backward()
    rtol = RTOL if backend == "torch" else TRITON_RTOL
    for rank, result in enumerate(results):
        stats, grad = result[f"grouped {backend} {unbiased}"]
        _assert_close(stats, want.detach(), rtol)
        _assert_close(grad, world * x.grad[..., _rows(world, rank), :], rtol)
