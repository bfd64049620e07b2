"""The native CPU kernel's library: `csrc/ecf_cpu.c` built at first use, cached, and verified.

The C source is compiled with the system C compiler (`$CC`, else cc, gcc or clang; -O3
-march=native), about a second, and the library is cached in `$LEJEPA_KERNELS_CACHE` (else
`$XDG_CACHE_HOME/lejepa_kernels`, else `~/.cache/lejepa_kernels`) under a name that hashes the
source, compiler and CPU, with its sha256 and size beside it. Code is loaded only from a
directory that this user owns and only this user can write (else from a private
`lejepa_kernels-<uid>` directory inside it, as in a shared cache of mode 1777), and only from a
file of this user's, not a symbolic link, that only this user can write and that matches its
checksum; anything else is rebuilt. `library()` gives the loaded library, `unavailable_reason()`
why there is none.
"""

from __future__ import annotations

import contextlib
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
from pathlib import Path

from .private_cache import CACHE_ENV, CacheUnavailable, new_file, open_cache, open_own_file
from .private_cache import cache_dir as _configured_cache_dir

SOURCE = Path(__file__).parent / "csrc" / "ecf_cpu.c"
CHECKSUM_SUFFIX = ".sha256"
"""Beside each cached library, a file of that name plus this suffix holds "<sha256> <size>\\n"."""
LIBRARY_MODE = 0o755
"""The cached library's mode: readable by all, as libraries are; writable by its owner only."""
MAX_POINTS = 129
"""The longest grid the kernel takes: MAX_POINTS in csrc/ecf_cpu.c (checked when it loads)."""
_FLAG_SETS = (
    ["-O3", "-march=native", "-ffp-contract=fast"],
    ["-O3", "-ffp-contract=fast"],  # compilers or CPUs without -march=native
)


class CpuKernelUnavailable(RuntimeError):
    """The C kernel could not be built or loaded on this machine (the message says why)."""


_BLOCK_ARGUMENTS = [
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # P, groups, rows, ld
    ctypes.c_float, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # dt, col_begin, col_end, n_points
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,  # two per-group [n_points, ld] arrays, their ld
    ctypes.c_int64,  # the arrays' stride from one group to the next
]
_SIGNATURES = {
    "ecf_forward_block": (_BLOCK_ARGUMENTS, ctypes.c_int),
    "ecf_backward_block": (_BLOCK_ARGUMENTS, ctypes.c_int),
    "ecf_max_points": ([], ctypes.c_int),
}
"""The library's functions: (argument types, result type)."""


def cache_dir() -> Path:
    """The configured cache (`private_cache.cache_dir`); CpuKernelUnavailable when there is none."""
    try:
        return _configured_cache_dir()
    except CacheUnavailable as error:
        raise CpuKernelUnavailable(str(error)) from error


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


def _library_name(compiler: list[str]) -> str:
    """The cached library's file name: a hash of the source, compiler and flags, and CPU."""
    identity = [
        SOURCE.read_text(),
        shlex.join(compiler),
        _compiler_version(compiler),
        repr(_FLAG_SETS),
        _cpu_signature(),
    ]
    key = hashlib.sha256("\0".join(identity).encode()).hexdigest()[:16]
    return f"ecf_cpu-{key}.so"


def _compile(compiler: list[str]) -> bytes:
    """The library built from SOURCE (the first flag set that compiles), in a private scratch
    directory."""
    errors = []
    with tempfile.TemporaryDirectory(prefix="lejepa_kernels-") as scratch:
        output = os.path.join(scratch, "ecf_cpu.so")
        for flags in _FLAG_SETS:
            command = compiler + flags + ["-std=c11", "-shared", "-fPIC", str(SOURCE), "-lm", "-o", output]
            try:
                done = subprocess.run(
                    command, capture_output=True, text=True, errors="replace", timeout=300
                )
                error = done.stderr.strip()[-2000:] if done.returncode else None
            except (OSError, subprocess.TimeoutExpired) as failure:
                error = str(failure)
            if error is None:
                with open(output, "rb") as built:
                    return built.read()
            errors.append(f"{shlex.join(command)}: {error}")
    raise CpuKernelUnavailable("the C kernel did not compile:\n" + "\n".join(errors))


def _checksum_line(library: bytes) -> str:
    """What the checksum file beside a library holds: its sha256 and size."""
    return f"{hashlib.sha256(library).hexdigest()} {len(library)}\n"


def _open_valid_library(directory_fd: int, name: str) -> int | None:
    """A read descriptor of the library `name` in the cache when it is safe to load: a file of
    this user's that only this user can write, of the size and sha256 that its checksum file
    (held to the same rules) records. None otherwise: missing, planted, damaged or truncated (a
    library shorter than its ELF headers say kills the process with SIGBUS when loaded)."""
    library_fd = open_own_file(directory_fd, name)
    if library_fd is None:
        return None
    checksum_fd = open_own_file(directory_fd, name + CHECKSUM_SUFFIX)
    if checksum_fd is not None:
        with open(library_fd, "rb", closefd=False) as library, open(checksum_fd, "rb") as checksum:
            if checksum.read() == _checksum_line(library.read()).encode():
                return library_fd
    os.close(library_fd)
    return None


def _install(directory_fd: int, name: str, library: bytes) -> int:
    """Put the library under `name` in the cache and its checksum beside it, each written in full
    to a fresh file then renamed into place (concurrent builders, such as DDP ranks, never see
    part of one); a read descriptor of the library written."""
    partials = []
    try:
        partials.append(new_file(directory_fd, library, LIBRARY_MODE))
        partials.append(new_file(directory_fd, _checksum_line(library).encode(), 0o644))
        library_fd = os.open(partials[0], os.O_RDONLY | os.O_CLOEXEC, dir_fd=directory_fd)
        try:
            for partial, final in zip(partials, (name, name + CHECKSUM_SUFFIX)):
                os.replace(partial, final, src_dir_fd=directory_fd, dst_dir_fd=directory_fd)
            os.fsync(directory_fd)
        except OSError:
            os.close(library_fd)
            raise
    finally:
        for partial in partials:
            with contextlib.suppress(FileNotFoundError):  # renamed into place
                os.unlink(partial, dir_fd=directory_fd)
    return library_fd


def _load(library_fd: int, path: Path) -> ctypes.CDLL:
    """The library open at library_fd (kept in the cache at path), its functions typed. Loaded
    through the descriptor where /proc offers it, so the file checked is the file loaded; the
    descriptor then stays open for the life of the process, as the library stays loaded: the
    loader knows a library by the name it was loaded under, and this name must not come back
    for another file."""
    target = f"/proc/self/fd/{library_fd}" if os.path.isdir("/proc/self/fd") else str(path)
    try:
        lib = ctypes.CDLL(target)
    except OSError as error:
        raise CpuKernelUnavailable(f"could not load {path}: {error}") from error
    for symbol, (argtypes, restype) in _SIGNATURES.items():
        try:
            function = getattr(lib, symbol)
        except AttributeError:
            raise CpuKernelUnavailable(
                f"{path} has no function {symbol} (built from another source?); delete it to "
                "have it rebuilt"
            ) from None
        function.argtypes, function.restype = argtypes, restype
    return lib


@functools.cache
def library() -> ctypes.CDLL:
    """The kernel library, loaded from the cache, built there first when no valid one is there."""
    if sys.platform == "win32":
        raise CpuKernelUnavailable("the C kernel is built for Linux and macOS only")
    compiler = _compiler()
    name = _library_name(compiler)
    try:
        directory_fd, directory = open_cache()
        try:
            library_fd = _open_valid_library(directory_fd, name)
            if library_fd is None:
                library_fd = _install(directory_fd, name, _compile(compiler))
        finally:
            os.close(directory_fd)
    except CacheUnavailable as error:
        raise CpuKernelUnavailable(str(error)) from None
    except OSError as error:
        raise CpuKernelUnavailable(
            f"cannot write the kernel library ({error}); set ${CACHE_ENV} to a writable directory"
        ) from error
    lib = _load(library_fd, directory / name)
    if lib.ecf_max_points() != MAX_POINTS:
        raise CpuKernelUnavailable(
            f"{directory / name} takes grids of {lib.ecf_max_points()} points, not {MAX_POINTS} "
            "(built from another source?); delete it to have it rebuilt"
        )
    return lib


@functools.cache
def unavailable_reason() -> str | None:
    """None when the C kernel builds and loads here, else why not (checked once per process)."""
    try:
        library()
    except CpuKernelUnavailable as error:
        return str(error)
    return None

