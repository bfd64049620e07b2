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
import itertools
import os
import platform
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).parent / "csrc" / "ecf_cpu.c"
CACHE_ENV = "LEJEPA_KERNELS_CACHE"
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
    """The configured cache: $LEJEPA_KERNELS_CACHE, else $XDG_CACHE_HOME/lejepa_kernels, else
    ~/.cache/lejepa_kernels (the library goes in a private directory inside it when others could
    write there)."""
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


class _Untrusted(Exception):
    """A cache directory that others could have put code in (the message says why)."""


def _untrusted_because(status: os.stat_result, path: Path | str) -> str | None:
    """Why the file or directory `path`, of this fstat/lstat, could hold what another user put
    there (owned by them, or writable by group or others); None when only this user could."""
    problems = []
    if status.st_uid != os.geteuid():
        problems.append(f"owned by uid {status.st_uid}, not by this user (uid {os.geteuid()})")
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append(f"writable by other users (mode {stat.S_IMODE(status.st_mode):o})")
    return f"{path} is {' and '.join(problems)}" if problems else None


def _open_private_directory(path: Path) -> int:
    """A descriptor of the directory `path`, made (with any missing parents, mode 0o700) when
    missing, once checked through that descriptor: all later use goes through it, so nothing can
    be swapped in between. Raises _Untrusted when path is a symbolic link or others could write
    in it, OSError when it cannot be made or opened."""
    missing = itertools.takewhile(lambda p: not os.path.lexists(p), [path, *path.parents])
    for directory in reversed(list(missing)):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:  # made meanwhile by another process
            pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        if os.path.islink(path):
            raise _Untrusted(f"{path} is a symbolic link") from None
        raise
    reason = _untrusted_because(os.fstat(fd), path)
    if reason is not None:
        os.close(fd)
        raise _Untrusted(reason)
    return fd


def _open_cache() -> tuple[int, Path]:
    """(descriptor, path) of the directory the library is kept in: cache_dir() when this user
    owns it and only this user can write it, else a private lejepa_kernels-<uid> directory
    inside it (where a shared cache gives each user their own). CpuKernelUnavailable when
    neither will do; OSError when the cache cannot be made."""
    configured = cache_dir()
    try:
        return _open_private_directory(configured), configured
    except _Untrusted as problem:
        private = configured / f"lejepa_kernels-{os.geteuid()}"
        try:
            return _open_private_directory(private), private
        except _Untrusted as private_problem:
            detail = str(private_problem)
        except OSError as error:
            detail = f"{private} cannot be made ({error.strerror or error})"
        raise CpuKernelUnavailable(
            f"the kernel cache is unsafe to load code from: {problem}, and {detail}. Set "
            f"${CACHE_ENV} to a directory that you own and only you can write (mode 700)"
        ) from None


def _checksum_line(library: bytes) -> str:
    """What the checksum file beside a library holds: its sha256 and size."""
    return f"{hashlib.sha256(library).hexdigest()} {len(library)}\n"


def _open_own_file(directory_fd: int, name: str) -> int | None:
    """A read descriptor of the file `name` in the cache when it is a regular file (not a
    symbolic link) of this user's that only this user can write, else None."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory_fd)
    except OSError:  # missing, or a symbolic link
        return None
    status = os.fstat(fd)
    if stat.S_ISREG(status.st_mode) and _untrusted_because(status, name) is None:
        return fd
    os.close(fd)
    return None


def _open_valid_library(directory_fd: int, name: str) -> int | None:
    """A read descriptor of the library `name` in the cache when it is safe to load: a file of
    this user's that only this user can write, of the size and sha256 that its checksum file
    (held to the same rules) records. None otherwise: missing, planted, damaged or truncated (a
    library shorter than its ELF headers say kills the process with SIGBUS when loaded)."""
    library_fd = _open_own_file(directory_fd, name)
    if library_fd is None:
        return None
    checksum_fd = _open_own_file(directory_fd, name + CHECKSUM_SUFFIX)
    if checksum_fd is not None:
        with open(library_fd, "rb", closefd=False) as library, open(checksum_fd, "rb") as checksum:
            if checksum.read() == _checksum_line(library.read()).encode():
                return library_fd
    os.close(library_fd)
    return None


def _new_file(directory_fd: int, data: bytes, mode: int) -> str:
    """The name of a fresh file in the cache (mkstemp's recipe, relative to the directory's
    descriptor: a random name, O_EXCL) holding data, with the given mode, fsync'ed."""
    name = f".partial-{secrets.token_hex(8)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o600, dir_fd=directory_fd)
    try:
        with open(fd, "wb") as file:
            os.fchmod(fd, mode)
            file.write(data)
            file.flush()
            os.fsync(fd)
    except BaseException:
        os.unlink(name, dir_fd=directory_fd)
        raise
    return name


def _install(directory_fd: int, name: str, library: bytes) -> int:
    """Put the library under `name` in the cache and its checksum beside it, each written in full
    to a fresh file then renamed into place (concurrent builders, such as DDP ranks, never see
    part of one); a read descriptor of the library written."""
    partials = []
    try:
        partials.append(_new_file(directory_fd, library, LIBRARY_MODE))
        partials.append(_new_file(directory_fd, _checksum_line(library).encode(), 0o644))
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
        directory_fd, directory = _open_cache()
        try:
            library_fd = _open_valid_library(directory_fd, name)
            if library_fd is None:
                library_fd = _install(directory_fd, name, _compile(compiler))
        finally:
            os.close(directory_fd)
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

