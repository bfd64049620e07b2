"""The native CPU backend: the ECF sums and their gradient with a small C kernel.

The block loop is the PyTorch path's (`fallback.py`): torch forms each [rows x slices] block of
projections `P = x_blk @ A_blk`; then `csrc/ecf_cpu.c` takes one vector sincos of u = h P and
runs the Chebyshev recurrence over the grid t_k = k h in vector registers, summing over rows
(forward) or forming dP in place of P (backward) in one pass, where the PyTorch path needs two
tensor ops per grid point. The block's columns are split over `torch.get_num_threads()` threads
(ctypes releases the GIL).

The C source is compiled at first use with the system C compiler (`$CC`, else cc, gcc or clang;
-O3 -march=native), about a second, and the library is cached in `$LEJEPA_KERNELS_CACHE` (else
`~/.cache/lejepa_kernels`) under a name that hashes the source, compiler and CPU. The kernel
takes CPU tensors on a uniform grid of at most `max_points()` points, computing in fp32 (fp32,
bf16 and fp16 inputs); `supports` says whether a call qualifies.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .fallback import BLOCK_ELEMENTS, grad_proj_coefficients

SOURCE = Path(__file__).parent / "csrc" / "ecf_cpu.c"
CACHE_ENV = "LEJEPA_KERNELS_CACHE"
VECTOR_WIDTH = 16
"""Columns per vector in the kernel: thread column ranges are multiples of it."""
_FLAG_SETS = (
    ["-O3", "-march=native", "-ffp-contract=fast"],
    ["-O3", "-ffp-contract=fast"],  # compilers or CPUs without -march=native
)


class CpuKernelUnavailable(RuntimeError):
    """The C kernel could not be built or loaded on this machine (the message says why)."""


def cache_dir() -> Path:
    """Where built libraries are kept: $LEJEPA_KERNELS_CACHE, else ~/.cache/lejepa_kernels."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "lejepa_kernels"
    try:
        return Path.home() / ".cache" / "lejepa_kernels"
    except RuntimeError as error:  # no $HOME and no password entry
        raise CpuKernelUnavailable(f"no home directory ({error}); set ${CACHE_ENV}") from error


def _compiler() -> list[str]:
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    raise CpuKernelUnavailable("no C compiler found (set $CC, or install gcc or clang)")


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's feature flags where Linux lists them."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _compiler_version(compiler: list[str]) -> str:
    try:
        done = subprocess.run(
            compiler + ["--version"], capture_output=True, text=True, errors="replace", timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout


def _build() -> Path:
    compiler = _compiler()
    identity = [
        SOURCE.read_text(),
        shlex.join(compiler),
        _compiler_version(compiler),
        repr(_FLAG_SETS),
        _cpu_signature(),
    ]
    key = hashlib.sha256("\0".join(identity).encode()).hexdigest()[:16]
    library = cache_dir() / f"ecf_cpu-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in _FLAG_SETS:
        # Build beside the target, then rename: concurrent builders (DDP ranks) never see a
        # partly written library.
        fd, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
        os.close(fd)
        command = compiler + flags + ["-std=c11", "-shared", "-fPIC", str(SOURCE), "-lm", "-o", partial]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, errors="replace", timeout=300
            )
            error = done.stderr.strip()[-2000:] if done.returncode else None
        except (OSError, subprocess.TimeoutExpired) as failure:
            error = str(failure)
        if error is None:
            os.chmod(partial, 0o755)  # mkstemp made it private; a shared cache serves every user
            os.replace(partial, library)
            return library
        os.unlink(partial)
        errors.append(f"{shlex.join(command)}: {error}")
    raise CpuKernelUnavailable("the C kernel did not compile:\n" + "\n".join(errors))


@functools.cache
def _library() -> ctypes.CDLL:
    if sys.platform == "win32":
        raise CpuKernelUnavailable("the C kernel is built for Linux and macOS only")
    try:
        path = _build()
    except OSError as error:
        raise CpuKernelUnavailable(
            f"cannot write the kernel library ({error}); set ${CACHE_ENV} to a writable directory"
        ) from error
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        raise CpuKernelUnavailable(f"could not load {path}: {error}") from error
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.ecf_forward_block.argtypes = [ptr, i64, i64, f32, i64, i64, i64, ptr, ptr, i64]
    lib.ecf_forward_block.restype = ctypes.c_int
    lib.ecf_backward_block.argtypes = [ptr, i64, i64, f32, i64, i64, i64, ptr, ptr, i64]
    lib.ecf_backward_block.restype = ctypes.c_int
    lib.ecf_max_points.argtypes = []
    lib.ecf_max_points.restype = ctypes.c_int
    return lib


@functools.cache
def unavailable_reason() -> str | None:
    """None when the C kernel builds and loads here, else why not (checked once per process)."""
    try:
        _library()
    except CpuKernelUnavailable as error:
        return str(error)
    return None


def max_points() -> int:
    """The longest grid the kernel takes (raises CpuKernelUnavailable if it cannot load)."""
    return _library().ecf_max_points()


def _check_points(n_points: int) -> None:
    if not 1 <= n_points <= max_points():
        raise ValueError(f"the native CPU kernel takes 1 to {max_points()} grid points, got {n_points}")


def supports(x: torch.Tensor, n_points: int, uniform_step: float) -> bool:
    """True when the kernel takes this call: x on the CPU and not fp64, a uniform grid
    (uniform_step > 0) of at most max_points() points. Assumes the kernel loads."""
    return (
        x.device.type == "cpu"
        and x.dtype != torch.float64
        and uniform_step > 0
        and n_points <= max_points()
    )


_pool_lock = threading.Lock()
_pool_state: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool)


def _pool(n_threads: int) -> ThreadPoolExecutor:
    """This process's worker threads, at least n_threads of them: one pool, grown on demand (a
    forked child gets its own)."""
    global _pool_state
    with _pool_lock:
        if _pool_state is None or _pool_state[0] != os.getpid() or _pool_state[1] < n_threads:
            if _pool_state is not None and _pool_state[0] == os.getpid():
                _pool_state[2].shutdown(wait=False)
            pool = ThreadPoolExecutor(n_threads, thread_name_prefix="lejepa_kernels")
            _pool_state = (os.getpid(), n_threads, pool)
        return _pool_state[2]


def _over_columns(call: Callable[[int, int], int], width: int) -> None:
    """call(begin, end) on contiguous ranges covering [0, width), one per thread; each must
    return 0 (the kernel's success)."""
    per_thread = -(-width // max(1, torch.get_num_threads()))
    per_thread = -(-per_thread // VECTOR_WIDTH) * VECTOR_WIDTH
    ranges = [(begin, min(width, begin + per_thread)) for begin in range(0, width, per_thread)]
    if len(ranges) == 1:
        codes = [call(*ranges[0])]
    else:
        codes = [f.result() for f in [_pool(len(ranges)).submit(call, *r) for r in ranges]]
    if any(codes):
        raise RuntimeError(f"the native CPU kernel failed (codes {codes})")


def _blocks(n_rows: int, n_slices: int, block_elements: int) -> Iterator[tuple[slice, slice]]:
    """(row range, slice range) pairs covering [n_rows, n_slices]: each block has a vector of
    columns per thread (or all of them), then as many columns and rows as block_elements allows."""
    min_cols = VECTOR_WIDTH * max(1, torch.get_num_threads())
    cols_per_block = min(n_slices, max(min_cols, block_elements // n_rows))
    rows_per_block = min(n_rows, max(1, block_elements // cols_per_block))
    for s0 in range(0, n_slices, cols_per_block):
        for r0 in range(0, n_rows, rows_per_block):
            yield slice(r0, r0 + rows_per_block), slice(s0, s0 + cols_per_block)


def ecf_sums(
    x: torch.Tensor,
    A: torch.Tensor,
    n_points: int,
    uniform_step: float,
    block_elements: int = BLOCK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, Z), [S, T] fp32 each: sums over rows of cos and sin of k * uniform_step * (x @ A).

    x: [N, D] fp32/bf16/fp16 on the CPU; A: [D, S]; T = n_points. Partial sums over 256 rows
    are added in fp64.
    """
    lib = _library()
    _check_points(n_points)
    x, A = x.float(), A.float()
    n_slices = A.shape[1]
    sums = torch.zeros(2, n_points, n_slices, dtype=torch.float64)
    for rows, cols in _blocks(x.shape[0], n_slices, block_elements):
        P = torch.mm(x[rows], A[:, cols])
        n_rows, width = P.shape
        cos_out, sin_out = sums[0, :, cols], sums[1, :, cols]
        _over_columns(
            lambda begin, end: lib.ecf_forward_block(
                P.data_ptr(), n_rows, width, uniform_step, begin, end, n_points,
                cos_out.data_ptr(), sin_out.data_ptr(), n_slices,
            ),
            width,
        )
    return sums[0].T.float().contiguous(), sums[1].T.float().contiguous()


def ecf_sums_backward(
    x: torch.Tensor,
    A: torch.Tensor,
    t: torch.Tensor,
    grad_cos: torch.Tensor,
    grad_sin: torch.Tensor,
    uniform_step: float,
    block_elements: int = BLOCK_ELEMENTS,
) -> torch.Tensor:
    """dx [N, D] in x's dtype from the gradients [S, T] of the sums, recomputing projections.

    t: [T], the grid (t_k = k * uniform_step). dx = dP @ A^T with
    dP[n, s] = sum_k t_k (cos(t_k P) grad_sin - sin(t_k P) grad_cos)[n, s, k].
    """
    lib = _library()
    xc, A, t = x.float(), A.float(), t.float()
    n_points, n_slices = t.numel(), A.shape[1]
    _check_points(n_points)
    cos_coef, sin_coef = grad_proj_coefficients(t, grad_cos, grad_sin)
    grad_x = torch.zeros_like(xc)
    for rows, cols in _blocks(xc.shape[0], n_slices, block_elements):
        P = torch.mm(xc[rows], A[:, cols])
        n_rows, width = P.shape
        cos_in, sin_in = cos_coef[:, cols], sin_coef[:, cols]
        _over_columns(
            lambda begin, end: lib.ecf_backward_block(
                P.data_ptr(), n_rows, width, uniform_step, begin, end, n_points,
                cos_in.data_ptr(), sin_in.data_ptr(), n_slices,
            ),
            width,
        )
        grad_x[rows].addmm_(P, A[:, cols].T)  # P now holds the block's dP
    return grad_x.to(x.dtype)
