"""directions="blockwise": the generator's statistics, the loss against an fp64 oracle that
materialises the same directions (2-D x; grouped x, the reductions and the unbiased form),
determinism, torch.compile, torch.distributed and flat memory."""

import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import CPU_BACKENDS, assert_no_worse_than_seed, embeddings, grouped_oracle, loss_and_grad

from lejepa_kernels import FusedSlicedEppsPulley, sliced_epps_pulley, torch_backend
from lejepa_kernels.blockwise import (
    DEFAULT_BLOCK_SIZE,
    block_key,
    blockwise_directions,
    orthonormal_groups,
)
from lejepa_kernels.functional import sliced_epps_pulley_on_directions
from lejepa_kernels.reference import EppsPulley, quadrature, random_directions


def direction_moments_z(A: torch.Tensor) -> tuple[float, float]:
    """Largest standardised deviation of the mean and of the covariance of the unit columns of
    A [D, M] from those of the uniform distribution on the sphere (0 and I/D).

    For a uniform unit vector a in D dimensions: E a_i = 0, Var a_i = 1/D; E a_i^2 a_j^2 =
    1/(D(D+2)) (i != j), E a_i^4 = 3/(D(D+2)). So over M independent columns the mean of a_i has
    standard error sqrt(1/(D M)), the covariance entry C_ij (i != j) sqrt(1/(D(D+2) M)) and C_ii
    sqrt((3/(D(D+2)) - 1/D^2) / M). Orthonormal groups only lower these variances.
    """
    A = A.double()
    dim, m = A.shape
    mean_z = A.mean(1).abs().max() / math.sqrt(1 / (dim * m))
    cov = A @ A.T / m
    off_sd = math.sqrt(1 / (dim * (dim + 2) * m))
    diag_sd = math.sqrt((3 / (dim * (dim + 2)) - 1 / dim**2) / m)
    eye = torch.eye(dim, dtype=torch.float64)
    sd = off_sd * (1 - eye) + diag_sd * eye
    cov_z = ((cov - eye / dim).abs() / sd).max()
    return float(mean_z), float(cov_z)


@pytest.mark.parametrize("orthogonal", [False, True])
def test_directions_are_unit_and_isotropic_over_steps(orthogonal):
    """Over 100 steps of 48 slices in blocks of 16 (orthogonal groups of 12 and 4), 4800
    directions in 12 dimensions: unit norm, mean and covariance within 5 standard errors of
    the uniform distribution's (8 + 78 statistics: a false alarm has probability ~1e-4)."""
    dim = 12
    A = torch.cat([
        blockwise_directions(dim, 48, step, seed=3, block_size=16, orthogonal=orthogonal) for step in range(100)
    ], dim=1)
    torch.testing.assert_close(A.norm(dim=0), torch.ones(A.shape[1]), rtol=0, atol=1e-6)
    mean_z, cov_z = direction_moments_z(A)
    assert mean_z < 5 and cov_z < 5, (mean_z, cov_z)
    # The bounds catch a biased sampler: directions folded into the positive orthant.
    assert direction_moments_z(A.abs())[0] > 50


def test_blocks_and_steps_draw_distinct_directions():
    """No two directions of 4 steps x 16 blocks are (nearly) the same: blocks never share a key."""
    A = torch.cat([blockwise_directions(16, 256, step, block_size=16) for step in range(4)], dim=1)
    gram = (A.T @ A).fill_diagonal_(0)
    assert gram.abs().max() < 0.99
    keys = {block_key(0, step, block) for step in range(64) for block in range(64)}
    assert len({key & 0xFFFFFFFF for key in keys}) == 64 * 64  # the CPU generator reads 32 bits


def test_orthogonal_groups_are_orthonormal_and_deterministic():
    """Blocks of 20 slices at D = 8: groups of 8, 8 and 4 columns, each orthonormal."""
    A = blockwise_directions(8, 50, 5, block_size=20, orthogonal=True).double()
    for start, stop in ((0, 8), (8, 16), (16, 20), (20, 28), (28, 36), (36, 40), (40, 48), (48, 50)):
        group = A[:, start:stop]
        torch.testing.assert_close(group.T @ group, torch.eye(stop - start, dtype=torch.float64), rtol=0, atol=2e-6)
    assert (A[:, :8].T @ A[:, 8:16]).abs().max() > 0.1  # different groups are independent
    torch.testing.assert_close(A, blockwise_directions(8, 50, 5, block_size=20, orthogonal=True).double(),
                               rtol=0, atol=0)
    G = torch.randn(6, 6, dtype=torch.float64)
    Q = orthonormal_groups(G)
    R = Q.T @ G  # upper triangular with a positive diagonal: Q is the unique such factor
    assert torch.all(R.diagonal() > 0)
    torch.testing.assert_close(R.tril(-1), torch.zeros(6, 6, dtype=torch.float64), rtol=0, atol=1e-12)


def oracle_loss(x: torch.Tensor, A: torch.Tensor, t_max: float = 3.0, n_points: int = 17) -> torch.Tensor:
    """The seed's statistic (`reference.EppsPulley`) on the projections x @ A, in x's dtype."""
    ep = EppsPulley(t_max, n_points).to(x.dtype if x.dtype == torch.float64 else torch.float32)
    return ep(x @ A.to(x.dtype)).mean()


CASES = [  # N, D, S, block_size: odd shapes, a short last block, a block wider than D
    (37, 11, 45, 16),
    (5, 3, 7, 7),
    (64, 6, 130, 64),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("orthogonal", [False, True])
@pytest.mark.parametrize("case", CASES, ids=[f"{n}x{d}-S{s}-B{b}" for n, d, s, b in CASES])
def test_loss_and_gradient_against_fp64_oracle(backend, dtype, orthogonal, case):
    n, d, s, block = case
    if dtype == torch.float64 and backend != "torch":
        pytest.skip("the kernels take fp32/bf16/fp16")
    if backend == "triton" and (dtype != torch.float32 or case != CASES[0]):
        pytest.skip("Triton's interpreter is slow: one case")
    step, seed = 9, 4
    x = embeddings(n, d, dtype, seed=n, scale=1.3)
    module = FusedSlicedEppsPulley(s, backend=backend, directions="blockwise", block_size=block, seed=seed,
                                   orthogonal=orthogonal)
    module.global_step.fill_(step)
    loss, grad = loss_and_grad(module, x)
    A = blockwise_directions(d, s, step, seed=seed, block_size=block, orthogonal=orthogonal)
    truth_loss, truth_grad = loss_and_grad(lambda z: oracle_loss(z, A.double()), x.double())
    seed_loss, seed_grad = loss_and_grad(lambda z: oracle_loss(z, A), x)
    assert loss.dtype == torch_backend.compute_dtype(x) and grad.dtype == dtype
    assert_no_worse_than_seed(loss, seed_loss, truth_loss, "loss")
    assert_no_worse_than_seed(grad, seed_grad, truth_grad, "grad")
    assert grad.abs().max() > 0


def test_functional_matches_module_and_oracle():
    x = embeddings(40, 7, torch.float64)
    A = blockwise_directions(7, 33, 12, seed=2, block_size=10)
    got = sliced_epps_pulley(x, 12, 33, directions="blockwise", block_size=10, seed=2)
    torch.testing.assert_close(got, oracle_loss(x, A.double()), rtol=1e-12, atol=0)
    module = FusedSlicedEppsPulley(33, directions="blockwise", block_size=10, seed=2)
    module.global_step.fill_(12)
    torch.testing.assert_close(module(x), got, rtol=0, atol=0)


GROUPED = dict(n=13, d=7, num_slices=33, block_size=10, step=9, seed=4)
"""Grouped cases: odd sizes, blocks of 10, 10, 10 and 3 slices."""
LEADS = {"3-D": (3,), "4-D": (2, 2)}


def grouped_x(lead: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """(*lead, 13, 7) rows, group g scaled by 0.7 + 0.2 g and shifted by 0.3 g (unequal groups),
    drawn in fp64 then cast to dtype."""
    groups = math.prod(lead)
    n, d = GROUPED["n"], GROUPED["d"]
    index = torch.arange(groups, dtype=torch.float64).view(groups, 1, 1)
    x = embeddings(groups * n, d, seed=groups).view(groups, n, d) * (0.7 + 0.2 * index) + 0.3 * index
    return x.view(*lead, n, d).to(dtype)


def blockwise_loss(x: torch.Tensor, backend: str = "torch", **kwargs) -> torch.Tensor:
    """`sliced_epps_pulley` on the GROUPED blockwise directions."""
    g = GROUPED
    return sliced_epps_pulley(x, g["step"], g["num_slices"], backend=backend, directions="blockwise",
                              block_size=g["block_size"], seed=g["seed"], **kwargs)


def result_and_grad(fn, x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(x), d sum(fn(x) * weights) / dx) at a detached copy of x (weights cast to the result's dtype)."""
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    (out * weights.to(out.dtype)).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("unbiased", [False, True], ids=["plug-in", "unbiased"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("lead", LEADS.values(), ids=LEADS.keys())
def test_grouped_reductions_unbiased_against_fp64_oracle(backend, dtype, unbiased, reduction, lead):
    """x (*, 13, 7), S = 33 in blocks of 10: the result and the gradient (of a random weighting of
    the statistics for "none", which checks the backward's hand-written derivative per group and
    slice) against `grouped_oracle` in fp64 on the same directions, no worse than the seed
    directions' path on those directions in the same dtype and backend."""
    if dtype == torch.float64 and backend != "torch":
        pytest.skip("the kernels take fp32/bf16/fp16")
    if backend == "triton" and (dtype != torch.float32 or reduction != "none" or not unbiased or lead != (3,)):
        pytest.skip("Triton's interpreter is slow: one case")
    g = GROUPED
    x = grouped_x(lead, dtype)
    A = blockwise_directions(g["d"], g["num_slices"], g["step"], seed=g["seed"], block_size=g["block_size"])
    t, phi, grid_weights = quadrature(3.0, 17)
    reduce = {"mean": torch.mean, "sum": torch.sum, "none": lambda stats: stats}[reduction]
    weights = torch.tensor(1.0, dtype=torch.float64)
    if reduction == "none":
        weights = torch.randn(*lead, g["num_slices"], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    options = dict(reduction=reduction, unbiased=unbiased)
    got, grad = result_and_grad(lambda z: blockwise_loss(z, backend, **options), x, weights)
    seed, seed_grad = result_and_grad(
        lambda z: sliced_epps_pulley_on_directions(z, A, t, phi, grid_weights, backend, 3.0 / 16, **options),
        x, weights,
    )
    truth, truth_grad = result_and_grad(lambda z: reduce(grouped_oracle(z, A, 3.0, 17, unbiased)), x.double(),
                                        weights)
    assert got.shape == truth.shape and got.dtype == torch_backend.compute_dtype(x) and grad.dtype == dtype
    assert_no_worse_than_seed(got, seed, truth, "result")
    assert_no_worse_than_seed(grad, seed_grad, truth_grad, "grad")
    if dtype == torch.float64:
        torch.testing.assert_close(got, truth, rtol=1e-10, atol=0)
        torch.testing.assert_close(grad, truth_grad, rtol=0, atol=1e-10 * truth_grad.abs().max().item())


@pytest.mark.parametrize("unbiased", [False, True], ids=["plug-in", "unbiased"])
def test_grouped_is_each_group_on_its_own(unbiased):
    """Three groups at once: the mean loss is the mean of the groups' own losses, on the same
    directions, with the same gradient; "none" stacks the groups' statistics."""
    x = grouped_x((3,), torch.float64)
    loss, grad = loss_and_grad(lambda z: blockwise_loss(z, unbiased=unbiased), x)
    alone, alone_grad = loss_and_grad(
        lambda z: torch.stack([blockwise_loss(group, unbiased=unbiased) for group in z]).mean(), x
    )
    torch.testing.assert_close(loss, alone, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, alone_grad, rtol=0, atol=1e-12 * alone_grad.abs().max().item())
    stats = blockwise_loss(x, reduction="none", unbiased=unbiased)
    alone_stats = torch.stack([blockwise_loss(group, reduction="none", unbiased=unbiased) for group in x])
    assert stats.shape == (3, GROUPED["num_slices"])
    torch.testing.assert_close(stats, alone_stats, rtol=1e-12, atol=0)


def test_same_step_and_seed_same_loss_else_different():
    x = embeddings(64, 16, torch.float32)
    first, second = (FusedSlicedEppsPulley(300, directions="blockwise", block_size=64) for _ in range(2))
    losses = [first(x) for _ in range(3)]
    for loss in losses:
        torch.testing.assert_close(second(x), loss, rtol=0, atol=0)
    assert len({loss.item() for loss in losses}) == 3  # each step its own directions
    other_seed = FusedSlicedEppsPulley(300, directions="blockwise", block_size=64, seed=1)
    assert other_seed(x).item() != losses[0].item()


@pytest.mark.parametrize("orthogonal", [False, True])
def test_mean_loss_over_steps_matches_seed_directions(orthogonal):
    """Anisotropic embeddings (scales 0.3 to 2): both kinds of directions are uniform on the
    sphere, so the mean loss over 60 steps agrees within 4 standard errors of the difference."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g) * torch.linspace(0.3, 2.0, 16)
    seed_module = FusedSlicedEppsPulley(32, orthogonal=orthogonal)
    blockwise = FusedSlicedEppsPulley(32, directions="blockwise", block_size=16, orthogonal=orthogonal)
    with torch.no_grad():
        seed_losses = torch.stack([seed_module(x) for _ in range(60)]).double()
        block_losses = torch.stack([blockwise(x) for _ in range(60)]).double()
    difference = (block_losses.mean() - seed_losses.mean()).abs()
    standard_error = (block_losses.var() / 60 + seed_losses.var() / 60).sqrt()
    assert difference < 4 * standard_error, (block_losses.mean(), seed_losses.mean(), standard_error)
    assert standard_error < 0.05 * seed_losses.mean()  # the comparison is not vacuous


def test_seed_directions_orthogonal_are_the_seed_matrix_orthonormalised():
    x = embeddings(30, 5, torch.float64)
    module = FusedSlicedEppsPulley(12, orthogonal=True)
    module.global_step.fill_(3)
    A = orthonormal_groups(random_directions(5, 12, 3).double())
    torch.testing.assert_close(module(x), oracle_loss(x, A), rtol=1e-6, atol=0)


def test_seed_directions_orthogonal_compile_fullgraph():
    x = torch.randn(30, 5)
    compiled_module, eager_module = (FusedSlicedEppsPulley(12, orthogonal=True) for _ in range(2))
    loss_c, grad_c = loss_and_grad(torch.compile(compiled_module, backend="aot_eager", fullgraph=True), x)
    loss_e, grad_e = loss_and_grad(eager_module, x)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-5, atol=1e-8)


def test_backends_see_only_blocks(monkeypatch):
    """Every ECF call of the forward and backward takes one block of directions, never [D, S]."""
    widths = []
    for name in ("ecf_sums", "ecf_sums_backward"):
        original = getattr(torch_backend, name)

        def record(x, A, *args, _original=original, **kwargs):
            widths.append(A.shape[1])
            return _original(x, A, *args, **kwargs)

        monkeypatch.setattr(torch_backend, name, record)
    x = torch.randn(20, 8, requires_grad=True)
    FusedSlicedEppsPulley(100, backend="torch", directions="blockwise", block_size=32)(x).backward()
    # forward: the sums of each block; backward: each block's sums, then its gradient
    assert widths == [32, 32, 32, 4] + [32, 32, 32, 32, 32, 32, 4, 4]


COMPILE_CASES = {
    "2-D-mean": ((30, 8), {}),
    "grouped-none-unbiased": ((2, 15, 8), dict(reduction="none", unbiased=True)),
}


@pytest.mark.parametrize("shape, options", COMPILE_CASES.values(), ids=COMPILE_CASES.keys())
def test_compiled_fullgraph_is_one_op_and_matches_eager(shape, options):
    graphs = []

    def record(gm, example_inputs):
        graphs.append([str(node.target) for node in gm.graph.nodes if node.op == "call_function"])
        return gm

    x = torch.randn(*shape)
    module = FusedSlicedEppsPulley(50, directions="blockwise", block_size=16, **options)
    torch.compile(module, backend=record, fullgraph=True)(x)
    ops = [target for target in graphs[0] if "lejepa_kernels" in target]
    assert ops == ["lejepa_kernels.blockwise_sliced_epps_pulley.default"], graphs[0]

    compiled_module, eager_module = (FusedSlicedEppsPulley(50, directions="blockwise", block_size=16, **options)
                                     for _ in range(2))
    compiled = torch.compile(compiled_module, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        loss_c, grad_c = loss_and_grad(lambda z: compiled(z).sum(), x)
        loss_e, grad_e = loss_and_grad(lambda z: eager_module(z).sum(), x)
        torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=0)
        torch.testing.assert_close(grad_c, grad_e, rtol=0, atol=0)
    assert compiled_module.global_step.item() == 2


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(directions="other"), ValueError, "directions must be one of"),
        (dict(directions="blockwise", block_size=0), ValueError, "block_size must be an integer >= 1"),
        (dict(directions="blockwise", block_size=True), ValueError, "block_size must be an integer >= 1"),
        (dict(directions="blockwise", block_size=2.0), ValueError, "block_size must be an integer >= 1"),
        (dict(directions="blockwise", orthogonal="yes"), TypeError, "orthogonal must be a bool"),
        (dict(directions="blockwise", seed=1.5), TypeError, "seed must be an int"),
        (dict(block_size=64), ValueError, "apply to directions='blockwise'"),
        (dict(seed=1), ValueError, "apply to directions='blockwise'"),
    ],
)
def test_bad_direction_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        FusedSlicedEppsPulley(16, **kwargs)
    with pytest.raises(error, match=match):
        sliced_epps_pulley(torch.randn(4, 3), 0, 16, **kwargs)


def test_default_block_size():
    assert FusedSlicedEppsPulley(8, directions="blockwise").direction_spec.block_size == DEFAULT_BLOCK_SIZE


# --- torch.distributed: 2 gloo processes, unequal batches ----------------------------------------

ROWS = (9, 4)


def distributed_groups() -> torch.Tensor:
    """[2, 13, 6] fp64: the same rows twice, the second group at half scale."""
    return embeddings(sum(ROWS), 6, torch.float64) * torch.tensor([1.0, 0.5], dtype=torch.float64).view(2, 1, 1)


def distributed_stat_weights() -> torch.Tensor:
    """[2, 40] fp64: the weighting of the "none" statistics whose gradient the test checks."""
    return torch.linspace(-1, 1, 2 * 40, dtype=torch.float64).view(2, 40)


def _distributed_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x = embeddings(sum(ROWS), 6, torch.float64)
    rows = slice(sum(ROWS[:rank]), sum(ROWS[: rank + 1]))
    module = FusedSlicedEppsPulley(40, directions="blockwise", block_size=16, seed=5)
    loss, grad = loss_and_grad(module, x[rows])
    grouped = FusedSlicedEppsPulley(40, directions="blockwise", block_size=16, seed=5, reduction="none",
                                    unbiased=True)
    stats, grouped_grad = result_and_grad(grouped, distributed_groups()[:, rows], distributed_stat_weights())
    torch.save({"loss": loss, "grad": grad, "stats": stats, "grouped_grad": grouped_grad}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_distributed_loss_is_the_concatenated_batch_and_gradient_w_times():
    """2-D x with the mean, and 2 groups with unbiased statistics ("none"; the gradient of a
    weighting of them), 9 + 4 rows per group on the 2 ranks: the statistics of the concatenated
    batch on every rank, and W = 2 times its gradient for each rank's rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.spawn(_distributed_worker, args=(2, os.path.join(tmp, "init"), out), nprocs=2)
        results = [torch.load(f"{out}.{rank}") for rank in range(2)]
    x = embeddings(sum(ROWS), 6, torch.float64)
    A = blockwise_directions(6, 40, 0, seed=5, block_size=16).double()
    truth_loss, truth_grad = loss_and_grad(lambda z: oracle_loss(z, A), x)
    truth_stats, truth_grouped_grad = result_and_grad(
        lambda z: grouped_oracle(z, A, 3.0, 17, unbiased=True), distributed_groups(), distributed_stat_weights()
    )
    for rank, result in enumerate(results):
        rows = slice(sum(ROWS[:rank]), sum(ROWS[: rank + 1]))
        torch.testing.assert_close(result["loss"], truth_loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(result["grad"], 2 * truth_grad[rows], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(result["stats"], truth_stats, rtol=1e-10, atol=0)
        torch.testing.assert_close(result["grouped_grad"], 2 * truth_grouped_grad[:, rows], rtol=1e-10, atol=1e-14)


# --- memory: one CPU call, flat in S ---------------------------------------------------------------

PEAK_SCRIPT = """
import sys, torch
from lejepa_kernels import FusedSlicedEppsPulley
torch.set_num_threads(1)
x = torch.randn(64, 64, requires_grad=True)
def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))
for directions, slices in (item.split(":") for item in sys.argv[1:]):
    kwargs = dict(block_size=1024) if directions == "blockwise" else dict()
    module = FusedSlicedEppsPulley(int(slices), directions=directions, backend="torch", **kwargs)
    for _ in range(2):
        module(x).backward()
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    module(x).backward()
    print((status("VmHWM") - before) / 1024)
    del module
"""


def peak_extra_mib(*cases: tuple[str, int]) -> list[float]:
    """Peak extra resident memory (MiB) of one forward+backward call of each (directions, slices)
    case, after two warm-up calls, in one fresh process whose peak is reset before each measured
    call; glibc maps allocations of 64 KiB or more on their own, and unmaps them when freed, so
    the peak follows the live tensors."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    arguments = [f"{directions}:{slices}" for directions, slices in cases]
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, *arguments],
                            capture_output=True, text=True, check=True, env=env)
    return [float(line) for line in result.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_is_flat_in_the_slice_count():
    """N = 64, D = 64, blocks of 1024: from S = 2^14 to 2^16 blockwise's peak grows by less than
    1 MiB; the seed's, whose A [D, S] and [S, T] sums grow by 12 and 6.4 MiB (fp32), by more."""
    blockwise_small, blockwise_large, seed_small, seed_large = peak_extra_mib(
        ("blockwise", 1 << 14), ("blockwise", 1 << 16), ("seed", 1 << 14), ("seed", 1 << 16)
    )
    assert blockwise_large - blockwise_small < 1.0, (blockwise_small, blockwise_large)
    assert seed_large - seed_small > 10.0, (seed_small, seed_large)


# --- LeJEPA and `lejepa-kernels pretrain --directions` -------------------------------------------


def test_lejepa_passes_directions_to_its_sigreg():
    from lejepa_kernels.lejepa import LeJEPA

    model = LeJEPA("test_vit", n_slices=64, directions="blockwise", orthogonal=True)
    assert model.sigreg.direction_spec.kind == "blockwise" and model.sigreg.direction_spec.orthogonal
    with pytest.raises(ValueError, match="need sigreg='fused'"):
        LeJEPA("test_vit", sigreg="reference", directions="blockwise")


def test_lejepa_per_view_statistics_on_blockwise_directions():
    """sigreg_views="per_view" with blockwise directions: the mean of the views' unbiased
    statistics on the step's blockwise directions, against the fp64 oracle."""
    from conftest import grouped_oracle

    from lejepa_kernels.lejepa import LeJEPA

    model = LeJEPA("test_vit", n_slices=40, directions="blockwise", unbiased=True, sigreg_views="per_view")
    model.sigreg.global_step.fill_(7)
    views = torch.randn(4, 9, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, _, sigreg_loss = LeJEPA._compute_loss(views, 2, model.sigreg.double(), 0.1, "per_view")
    A = blockwise_directions(6, 40, 7)
    torch.testing.assert_close(sigreg_loss, grouped_oracle(views, A, 3.0, 17, unbiased=True).mean(), rtol=1e-10, atol=0)


def test_pretrain_directions_option():
    import argparse

    from lejepa_kernels.pretrain.options import UsageError, add_arguments, resolve

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert resolve(parser.parse_args([])).directions == "seed"
    assert resolve(parser.parse_args(["--directions", "blockwise"])).directions == "blockwise"
    both = resolve(parser.parse_args(["--directions", "blockwise", "--sigreg-views", "per_view"]))
    assert (both.directions, both.sigreg_views) == ("blockwise", "per_view")
    with pytest.raises(UsageError, match="--directions blockwise needs --sigreg fused"):
        resolve(parser.parse_args(["--directions", "blockwise", "--sigreg", "reference"]))
    saved = vars(resolve(parser.parse_args([])))
    del saved["directions"]  # a checkpoint written before --directions existed
    assert resolve(parser.parse_args([]), saved).directions == "seed"
    with pytest.raises(SystemExit):
        parser.parse_args(["--directions", "other"])


def test_the_blockwise_op_takes_groups_only():
    from lejepa_kernels.blockwise import DirectionSpec, sliced_epps_pulley_blockwise

    t, phi, weights = EppsPulley().t, EppsPulley().phi, EppsPulley().weights
    with pytest.raises(ValueError, match=r"takes x \[G, N, D\], got shape \(5, 3\)"):
        sliced_epps_pulley_blockwise(torch.randn(5, 3), torch.tensor(0), 8, t, phi, weights, "torch", 0.1875,
                                     DirectionSpec("blockwise"))
