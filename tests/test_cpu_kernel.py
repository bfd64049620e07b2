"""The native CPU kernel against the fp64 oracle: sums, gradients, dtypes, tiling, threads, and
what happens when it cannot be built."""

import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import embeddings, has_c_compiler, loss_and_grad, uniform_grid

from lejepa_kernels import FusedSlicedEppsPulley, cpu_backend, cpu_library, ecf_sums
from lejepa_kernels.backends import choose
from lejepa_kernels.reference import SlicedEppsPulley, random_directions

pytestmark = pytest.mark.skipif(not has_c_compiler(), reason="no C compiler here")


def test_kernel_builds_where_a_compiler_exists():
    assert cpu_library.unavailable_reason() is None


def trig_sums_and_grad(x, A, t, grad_cos, grad_sin):
    """fp64 truth: the sums [S, T] and the gradient of sum(C * grad_cos + Z * grad_sin)."""
    x = x.detach().double().requires_grad_()
    angles = (x @ A.double()).unsqueeze(-1) * t.double()
    cos_sums, sin_sums = angles.cos().sum(0), angles.sin().sum(0)
    ((cos_sums * grad_cos).sum() + (sin_sums * grad_sin).sum()).backward()
    return cos_sums.detach(), sin_sums.detach(), x.grad


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_auto_picks_the_kernel_for_cpu_tensors():
    assert choose("auto", torch.zeros(2, 2), 17, 3.0 / 16) == "cpu"
    assert choose("auto", torch.zeros(2, 2, dtype=torch.bfloat16), 17, 3.0 / 16) == "cpu"
    assert choose("auto", torch.zeros(2, 2, dtype=torch.float64), 17, 3.0 / 16) == "torch"


@pytest.mark.parametrize("N, D, S", [(37, 24, 19), (2, 3, 1), (300, 96, 257), (613, 7, 64)])
def test_loss_and_gradient_match_the_fp64_oracle_over_steps(N, D, S):
    x = embeddings(N, D)
    fused = FusedSlicedEppsPulley(S, backend="cpu")
    oracle = SlicedEppsPulley(S)
    for _ in range(3):
        loss, grad = loss_and_grad(fused, x.float())
        ref_loss, ref_grad = loss_and_grad(oracle, x)
        assert loss.dtype == torch.float32 and grad.dtype == torch.float32
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-4 * ref_grad.abs().max())
    assert fused.global_step.item() == 3


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("block_elements", [1, 100, 5000, 1 << 20])
def test_any_blocks_and_threads_give_the_sums_and_gradient(threads, block_elements):
    """Blocks of one column up to all of them; column ranges split over 1-3 threads, with
    partial vectors at their ends; more rows than one fp32 partial sum (256)."""
    N, D, S, T = 533, 20, 71, 17
    x = embeddings(N, D, seed=1)
    A = random_directions(D, S, 3)
    dt = 3.0 / (T - 1)
    t = torch.arange(T) * dt
    grad_cos, grad_sin = torch.randn(2, S, T, generator=torch.Generator().manual_seed(2))
    want_cos, want_sin, want_grad = trig_sums_and_grad(x, A, t, grad_cos, grad_sin)
    cos_sums, sin_sums = (s[0] for s in cpu_backend.ecf_sums(x.float()[None], A, uniform_grid(T, dt), dt,
                                                             block_elements))
    assert cos_sums.dtype == torch.float32 and cos_sums.shape == (S, T)
    torch.testing.assert_close(cos_sums.double(), want_cos, rtol=0, atol=3e-6 * N)
    torch.testing.assert_close(sin_sums.double(), want_sin, rtol=0, atol=3e-6 * N)
    grad_x = cpu_backend.ecf_sums_backward(x.float()[None], A, t, grad_cos[None], grad_sin[None], dt,
                                           block_elements)[0]
    assert grad_x.dtype == torch.float32 and grad_x.shape == (N, D)
    torch.testing.assert_close(grad_x.double(), want_grad, rtol=0, atol=2e-5 * want_grad.abs().max())


@pytest.mark.parametrize("T, bound", [(3, 1e-6), (33, 1e-5), (129, 1.5e-4)])
def test_grid_lengths_against_fp64_trig(T, bound):
    """Short and long grids, |P| up to ~8 (the recurrence's error grows with T)."""
    N, D, S = 256, 16, 40
    x = embeddings(N, D, seed=2) * 2.0
    A = random_directions(D, S, 0)
    dt = 3.0 / (T - 1)
    t = torch.arange(T) * dt
    grad_cos, grad_sin = torch.randn(2, S, T, generator=torch.Generator().manual_seed(3))
    want_cos, want_sin, want_grad = trig_sums_and_grad(x, A, t, grad_cos, grad_sin)
    cos_sums, sin_sums = ecf_sums(x.float(), A, t, "cpu", dt=dt)
    assert (cos_sums.double() - want_cos).abs().max() / N < bound
    assert (sin_sums.double() - want_sin).abs().max() / N < bound
    grad_x = cpu_backend.ecf_sums_backward(x.float()[None], A, t, grad_cos[None], grad_sin[None], dt)[0]
    assert (grad_x.double() - want_grad).abs().max() / want_grad.abs().max() < 10 * bound


@pytest.mark.parametrize(
    "scale, t_max, T, tol",
    [(300.0, 3.0, 17, 2e-3), (1.0, 3e4, 3, 2e-2)],
    ids=["all-quadrants", "beyond-sincos-limit"],
)
def test_large_angles(scale, t_max, T, tol):
    """|u| = |h P| up to ~200 (every quadrant of the kernel's sincos), and up to ~5e4, past its
    limit of 8192 (those vectors take libm). fp32 rounding of P and u bounds the agreement."""
    N, D, S = 40, 8, 37
    x = embeddings(N, D, torch.float32, seed=4, scale=scale)
    A = random_directions(D, S, 2)
    dt = t_max / (T - 1)
    t = torch.arange(T) * dt
    grad_cos, grad_sin = torch.randn(2, S, T, generator=torch.Generator().manual_seed(5))
    want_cos, want_sin, want_grad = trig_sums_and_grad(x, A, t, grad_cos, grad_sin)
    cos_sums, sin_sums = (s[0] for s in cpu_backend.ecf_sums(x[None], A, uniform_grid(T, dt), dt))
    torch.testing.assert_close(cos_sums.double(), want_cos, rtol=0, atol=tol * N)
    torch.testing.assert_close(sin_sums.double(), want_sin, rtol=0, atol=tol * N)
    grad_x = cpu_backend.ecf_sums_backward(x[None], A, t, grad_cos[None], grad_sin[None], dt)[0]
    torch.testing.assert_close(grad_x.double(), want_grad, rtol=0, atol=tol * want_grad.abs().max())


def test_calls_the_kernel_does_not_take():
    """fp64 input, an arbitrary grid and a grid longer than MAX_POINTS: backend="cpu" refuses
    them, saying why; "auto" runs the PyTorch path and gives the sums."""
    N, D, S = 45, 9, 21
    x = embeddings(N, D)
    A = random_directions(D, S, 1)
    long_grid = cpu_library.MAX_POINTS + 2
    cases = [
        (x, torch.linspace(0, 3, 17, dtype=torch.float64), 3.0 / 16, 1e-12, "fp32, bf16 or fp16"),
        (x.float(), torch.tensor([0.0, 0.3, 1.1, 2.9]), 0.0, 1e-6, "arbitrary grid"),
        (x.float() * 0.3, torch.arange(long_grid) * (3.0 / (long_grid - 1)), 3.0 / (long_grid - 1), 3e-6,
         f"at most {cpu_library.MAX_POINTS} points"),
    ]
    for x_in, t, dt, tol, reason in cases:
        with pytest.raises(ValueError, match=reason):
            ecf_sums(x_in, A, t, "cpu", dt=dt)
        assert choose("auto", x_in, t.numel(), dt) == "torch"
        cos_sums, sin_sums = ecf_sums(x_in, A, t, "auto", dt=dt)
        angles = (x_in.double() @ A.double()).unsqueeze(-1) * t.double()
        torch.testing.assert_close(cos_sums.double(), angles.cos().sum(0), rtol=0, atol=tol * N)
        torch.testing.assert_close(sin_sums.double(), angles.sin().sum(0), rtol=0, atol=tol * N)


def test_one_worker_pool_whatever_the_thread_counts():
    """Changing torch's thread count grows the one pool; worker threads do not pile up."""
    x = embeddings(40, 6, torch.float32)
    A = random_directions(6, 300, 0)
    before = torch.get_num_threads()
    try:
        for n in (2, 5, 3, 8, 2):
            torch.set_num_threads(n)
            cpu_backend.ecf_sums(x[None], A, uniform_grid(5, 0.5), 0.5)
    finally:
        torch.set_num_threads(before)
    assert cpu_backend._pool_state[1] <= 8
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the replaced pools' threads exit once idle
        workers = [t for t in threading.enumerate() if t.name.startswith("lejepa_kernels")]
        if len(workers) <= 8:
            break
        time.sleep(0.05)
    assert len(workers) <= 8


def test_concurrent_calls_while_the_thread_count_changes():
    """Python threads calling the kernel at once while torch's thread count rises between calls
    (each rise grows the worker pool under the others' feet): every result matches fp64."""
    N, D, S, T, dt = 29, 6, 16 * 24 + 5, 7, 0.5
    x = embeddings(N, D, torch.float32, seed=3)
    A = random_directions(D, S, 4)
    angles = (x.double() @ A.double()).unsqueeze(-1) * (torch.arange(T) * dt).double()
    want_cos, want_sin = angles.cos().sum(0), angles.sin().sum(0)
    before, switch_interval = torch.get_num_threads(), sys.getswitchinterval()
    failures, start = [], threading.Barrier(4)

    def caller(index):
        start.wait()
        for n_threads in range(2, 25):
            try:
                torch.set_num_threads(n_threads + index % 2)
                cos_sums, sin_sums = (s[0] for s in cpu_backend.ecf_sums(x[None], A, uniform_grid(T, dt), dt))
                torch.testing.assert_close(cos_sums.double(), want_cos, rtol=0, atol=3e-6 * N)
                torch.testing.assert_close(sin_sums.double(), want_sin, rtol=0, atol=3e-6 * N)
            except Exception as error:  # noqa: BLE001 (reported by the test's thread)
                failures.append(f"thread {index}, {n_threads} threads: {error!r}")

    def drop_pool():  # the next call starts a fresh pool
        with cpu_backend._pool_lock:
            if cpu_backend._pool_state is not None:
                cpu_backend._pool_state[2].shutdown()
            cpu_backend._pool_state = None

    sys.setswitchinterval(1e-6)  # threads switch often, inside the pool's code too
    try:
        for _ in range(4):  # each round grows a fresh pool 23 times during the calls
            drop_pool()
            callers = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
            for thread in callers:
                thread.start()
            for thread in callers:
                thread.join()
    finally:
        sys.setswitchinterval(switch_interval)
        torch.set_num_threads(before)
        drop_pool()
    assert not failures, failures[:3]


def test_no_home_directory_is_an_unavailable_kernel(monkeypatch):
    def no_home():
        raise RuntimeError("Could not determine home directory.")

    for name in (cpu_library.CACHE_ENV, "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpu_library.Path, "home", no_home)
    with pytest.raises(cpu_library.CpuKernelUnavailable, match="LEJEPA_KERNELS_CACHE"):
        cpu_library.cache_dir()


@pytest.mark.parametrize(
    "broken, message",
    [("compiler", "did not compile"), ("cache", "writable directory")],
)
def test_unbuildable_kernel_auto_warns_and_explicit_cpu_raises(tmp_path, broken, message):
    """A compiler that does not exist, or a cache that cannot be a directory: 'auto' falls back
    to the PyTorch path with one warning and the same loss; backend='cpu' raises, saying why."""
    script = (
        "import sys, warnings, torch, lejepa_kernels as lk\n"
        "from lejepa_kernels.cpu_library import CpuKernelUnavailable\n"
        "x = torch.randn(33, 8, generator=torch.Generator().manual_seed(0))\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    loss = lk.FusedSlicedEppsPulley(16)(x)\n"
        "    lk.FusedSlicedEppsPulley(16)(x)\n"
        "assert len(caught) == 1 and 'slower PyTorch path' in str(caught[0].message), caught\n"
        "assert torch.equal(loss, lk.FusedSlicedEppsPulley(16, backend='torch')(x))\n"
        "try:\n"
        "    lk.FusedSlicedEppsPulley(16, backend='cpu')(x)\n"
        "except CpuKernelUnavailable as error:\n"
        "    assert sys.argv[1] in str(error), error\n"
        "else:\n"
        "    raise AssertionError('backend=cpu ran without its kernel')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, LEJEPA_KERNELS_CACHE=str(tmp_path / "cache"))
    env.pop("LEJEPA_KERNELS_BACKEND", None)
    if broken == "compiler":
        env["CC"] = "/nonexistent/no-such-cc"
    else:
        (tmp_path / "cache").write_text("a file where the cache directory should be")
        env["LEJEPA_KERNELS_CACHE"] = str(tmp_path / "cache" / "sub")
    done = subprocess.run(
        [sys.executable, "-c", script, message], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert not list(tmp_path.rglob("*.so"))


def test_grid_longer_than_the_kernel_holds_is_refused_not_overrun():
    x = embeddings(5, 3, torch.float32)
    A = random_directions(3, 4, 0)
    T = cpu_library.MAX_POINTS + 1
    with pytest.raises(ValueError, match=f"at most {cpu_library.MAX_POINTS} points"):
        cpu_backend.ecf_sums(x[None], A, uniform_grid(T, 0.1), 0.1)
    with pytest.raises(ValueError, match=f"at most {cpu_library.MAX_POINTS} points"):
        cpu_backend.ecf_sums_backward(x[None], A, torch.arange(T) * 0.1, torch.ones(1, 4, T), torch.ones(1, 4, T), 0.1)
