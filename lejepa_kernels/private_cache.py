"""The per-user cache of compiled kernels and tuning choices, safe to load from.

The cache is `$LEJEPA_KERNELS_CACHE`, else `$XDG_CACHE_HOME/lejepa_kernels`, else
`~/.cache/lejepa_kernels`. Files are read only from a directory that this user owns and only this
user can write (else from a private `lejepa_kernels-<uid>` directory inside it, as in a shared
cache of mode 1777), and only when they are regular files of this user's that only this user can
write; every check goes through an open descriptor, never a path that could be swapped between
check and use. Files are written whole to a fresh name, then renamed into place.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import stat
from pathlib import Path

CACHE_ENV = "LEJEPA_KERNELS_CACHE"


class CacheUnavailable(RuntimeError):
    """No cache directory that is safe to use (the message says why and how to fix it)."""


def cache_dir() -> Path:
    """The configured cache: $LEJEPA_KERNELS_CACHE, else $XDG_CACHE_HOME/lejepa_kernels, else
    ~/.cache/lejepa_kernels (files go in a private directory inside it when others could write
    there: `open_cache`)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "lejepa_kernels"
    try:
        return Path.home() / ".cache" / "lejepa_kernels"
    except RuntimeError as error:  # no $HOME and no password entry
        raise CacheUnavailable(f"no home directory ({error}); set ${CACHE_ENV}") from error


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


def open_cache() -> tuple[int, Path]:
    """(descriptor, path) of the directory the library is kept in: cache_dir() when this user
    owns it and only this user can write it, else a private lejepa_kernels-<uid> directory
    inside it (where a shared cache gives each user their own). CacheUnavailable when
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
        raise CacheUnavailable(
            f"the kernel cache is unsafe to load from: {problem}, and {detail}. Set "
            f"${CACHE_ENV} to a directory that you own and only you can write (mode 700)"
        ) from None


def open_own_file(directory_fd: int, name: str) -> int | None:
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


def new_file(directory_fd: int, data: bytes, mode: int) -> str:
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


def replace_file(directory_fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """Make `name` in the cache hold data: written in full to a fresh file, then renamed over
    `name` and the directory fsync'ed (readers see the old file or the new one, never a part)."""
    partial = new_file(directory_fd, data, mode)
    try:
        os.replace(partial, name, src_dir_fd=directory_fd, dst_dir_fd=directory_fd)
        os.fsync(directory_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):  # renamed into place
            os.unlink(partial, dir_fd=directory_fd)
