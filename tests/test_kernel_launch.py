"""What the Triton launchers own: operand layouts, the device, index ranges, fp32 accumulation.

The kernels run in Triton's CPU interpreter (see conftest); the fp64 PyTorch path is the oracle.
"""

import contextlib

import pytest
import torch
from conftest import DEVICE

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lejepa_kernels import ecf_sums, torch_backend  # noqa: E402
from lejepa_kernels.kernels import _tiles, config, ecf_backward, ecf_forward  # noqa: E402
from lejepa_kernels.kernels import backward as backward_module  # noqa: E402
from lejepa_kernels.kernels import forward as forward_module  # noqa: E402
from lejepa_kernels.reference import quadrature, random_directions  # noqa: E402

N, D, S, T = 37, 24, 19, 17


def embeddings(rows, features, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, features, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


def oracle(x, A, t, grad_cos, grad_sin):
    """(C, Z, dx) in fp64: direct trig on the fp64 inputs."""
    x, A, t = x.double(), A.double(), t.double()
    cos_sums, sin_sums = torch_backend.ecf_sums(x[None], A, t)
    grad_x = torch_backend.ecf_sums_backward(x[None], A, t, grad_cos.double()[None], grad_sin.double()[None])
    return cos_sums[0], sin_sums[0], grad_x[0]


def max_error(got, want):
    return (got.double() - want).abs().max().item()


def gradients(seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, S, T, generator=g).to(DEVICE)


@pytest.mark.parametrize("layout", ["grid", "directions", "both"])
def test_strided_grid_and_directions(layout):
    """A strided t (every other point of a finer grid) and a transposed A give the sums and
    the gradient of their contiguous copies (direct trig reads t)."""
    x = embeddings(N, D, torch.float32, seed=1)
    t, A = quadrature(3.0, T)[0].to(DEVICE), random_directions(D, S, 0, DEVICE)
    if layout in ("grid", "both"):
        t = torch.linspace(0, 3, 2 * T - 1, device=DEVICE)[::2]
    if layout in ("directions", "both"):
        A = A.T.contiguous().T  # the same values, column-major
    assert t.is_contiguous() == (layout == "directions")
    assert A.is_contiguous() == (layout == "grid")
    grad_cos, grad_sin = gradients()
    want_cos, want_sin, want_dx = oracle(x, A, t, grad_cos, grad_sin)
    got_cos, got_sin = ecf_forward(x, A, t, 0.0)
    assert max(max_error(got_cos, want_cos), max_error(got_sin, want_sin)) < 1e-4
    got_dx = ecf_backward(x, A, t, grad_cos, grad_sin, 0.0)
    assert max_error(got_dx, want_dx) < 1e-4 * want_dx.abs().max()


def test_strided_grid_through_ecf_sums():
    x = embeddings(N, D, torch.float32, seed=2).requires_grad_()
    A = random_directions(D, S, 0, DEVICE).T.contiguous().T  # column-major
    t = torch.linspace(0, 3, 2 * T - 1, device=DEVICE)[::2]
    grad_cos, grad_sin = gradients(8)
    want_cos, want_sin, want_dx = oracle(x.detach(), A, t, grad_cos, grad_sin)
    cos_sums, sin_sums = ecf_sums(x, A, t, backend="triton")
    ((cos_sums * grad_cos).sum() + (sin_sums * grad_sin).sum()).backward()
    assert max(max_error(cos_sums, want_cos), max_error(sin_sums, want_sin)) < 1e-4
    assert max_error(x.grad, want_dx) < 1e-4 * want_dx.abs().max()


def test_directions_must_match_the_embeddings():
    x = embeddings(N, D, torch.float32)
    t = quadrature(3.0, T)[0].to(DEVICE)
    with pytest.raises(ValueError, match=r"A must be \[D, S\]"):
        ecf_forward(x, random_directions(D + 1, S, 0, DEVICE), t, 0.0)
    with pytest.raises(ValueError, match=r"t must be 1-D"):
        ecf_forward(x, random_directions(D, S, 0, DEVICE), t[None], 0.0)


def test_launch_scope_selects_the_device_of_x(monkeypatch):
    """CUDA launches go to x's GPU, whichever GPU is current; CPU tensors need no guard."""
    selected = []

    @contextlib.contextmanager
    def cuda_device(device):
        selected.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", cuda_device)
    with config.launch_scope(torch.device("cuda", 1)):
        assert selected == [torch.device("cuda", 1)]
    with config.launch_scope(torch.device("cpu")):
        pass
    assert selected == [torch.device("cuda", 1)]


@pytest.mark.parametrize("module, kernel_name", [
    (forward_module, "_ecf_forward_kernel"), (backward_module, "_ecf_backward_kernel"),
])
def test_every_launch_is_inside_the_scope_of_x_device(monkeypatch, module, kernel_name):
    scopes, launches = [], []
    real_scope, real_kernel = module.launch_scope, getattr(module, kernel_name)

    @contextlib.contextmanager
    def recording_scope(device):
        with real_scope(device):
            scopes.append(device)
            yield
            scopes.pop()

    class RecordingKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(list(scopes))
                return real_kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, "launch_scope", recording_scope)
    monkeypatch.setattr(module, kernel_name, RecordingKernel())
    monkeypatch.setattr(backward_module, "DP_CHUNK_BYTES", N * 4 * 16)  # several chunks
    x = embeddings(N, D, torch.float32)
    A, t = random_directions(D, S, 0, DEVICE), quadrature(3.0, T)[0].to(DEVICE)
    if module is forward_module:
        ecf_forward(x, A, t, 3.0 / (T - 1))
    else:
        ecf_backward(x, A, t, *gradients(), 3.0 / (T - 1))
    assert launches and all(scope == [x.device] for scope in launches)


@pytest.mark.parametrize("field, value", [
    ("block_n", 8), ("block_s", 48), ("block_d", 8), ("block_d", 0), ("num_warps", 3),
])
def test_a_bad_kernel_config_is_refused(field, value):
    """Block sizes are powers of 2 and >= 16 (tl.arange, tl.dot's K); num_warps a power of 2."""
    fields = dict(block_n=32, block_s=32, block_d=32, num_warps=4, num_stages=2)
    config.KernelConfig(**fields)
    with pytest.raises(ValueError, match=f"KernelConfig.{field} must be a power of 2"):
        config.KernelConfig(**{**fields, field: value})


def test_every_shipped_config_is_accepted():
    for candidates in (config.FORWARD_CANDIDATES, config.BACKWARD_CANDIDATES):
        for kernel_config in (c for configs in candidates.values() for c in configs):
            config.KernelConfig(**vars(kernel_config))


def test_the_kernels_assert_their_block_sizes():
    """A block size that bypasses KernelConfig still stops at the kernel's tl.static_assert."""
    x, A, t = embeddings(N, D, torch.float32), random_directions(D, S, 0, DEVICE), quadrature(3.0, T)[0].to(DEVICE)
    partials = torch.zeros(1, 2, T, S, device=DEVICE)
    with pytest.raises(Exception, match="BLOCK_D must be >= 16"):
        forward_module._ecf_forward_kernel[(1, 1, 1)](
            x, A, t, partials,  # pointers
            N, D, S,  # sizes
            N * D, x.stride(0),  # strides
            1, N, 0.0,  # scalars
            T=T, CHUNK_T=T, UNIFORM=False, BLOCK_N=16, BLOCK_S=32, BLOCK_D=8, BLOCK_T=32,  # constexprs
            INPUT_PRECISION="ieee", UPCAST_BF16=False,
        )


def test_sizes_past_int32_indices_are_refused():
    """Row and slice indices are int32 in the kernels: larger sizes raise before anything is
    allocated (the expanded inputs below take no memory)."""
    x = embeddings(2, 8, torch.float32)
    t = quadrature(3.0, 3)[0].to(DEVICE)
    wide = torch.zeros(1, 1, device=DEVICE).expand(8, 2**31)
    with pytest.raises(ValueError, match="2\\^31"):
        ecf_forward(x, wide, t, 1.5)
    tall = torch.zeros(1, 8, device=DEVICE).expand(2**31, 8)
    grad = torch.zeros(1, 1, device=DEVICE).expand(4, 3)
    with pytest.raises(ValueError, match="2\\^31"):
        ecf_backward(tall, random_directions(8, 4, 0, DEVICE), t, grad, grad, 1.5)


@triton.jit
def _row_start_offsets(out_ptr, base_ptr, first_row, row_stride, ROWS: tl.constexpr):
    rows = first_row + tl.arange(0, ROWS)
    starts = _tiles.row_starts(base_ptr, rows, row_stride)
    tl.store(out_ptr + tl.arange(0, ROWS), starts.to(tl.int64) - base_ptr.to(tl.int64))


@pytest.mark.parametrize("first_row, row_stride", [(0, 3), (16, 2**27), (2**20, 2**12 + 1)])
def test_row_starts_are_64_bit(first_row, row_stride):
    """The kernels form every row offset with row_starts (rows of x, A, the dP buffer, the
    partial sums, the coefficients): its offsets pass 2^31 elements without wrapping."""
    out = torch.zeros(16, dtype=torch.int64, device=DEVICE)
    base = torch.zeros(1, dtype=torch.float32, device=DEVICE)
    _row_start_offsets[(1,)](out, base, first_row, row_stride, ROWS=16)
    rows = torch.arange(first_row, first_row + 16, dtype=torch.int64)
    assert out.cpu().tolist() == (rows * row_stride * base.element_size()).tolist()


def test_bf16_chunk_products_are_requested_in_fp32_on_gpus():
    """Off the CPU, a bf16 chunk's dP @ A^T comes out of cuBLAS in fp32 (`out_dtype`): checked
    on the meta device, which takes the same call (shapes and dtypes only)."""
    grad_x = torch.zeros(N, D, device="meta")
    dp = torch.empty(S, N, dtype=torch.bfloat16, device="meta").T
    directions = torch.empty(D, S, device="meta").T
    backward_module.add_product(grad_x, dp, directions)
    assert grad_x.dtype == torch.float32 and grad_x.shape == (N, D)
