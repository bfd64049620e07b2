"""Files written atomically: a reader sees the old file or the whole new one, never a part."""

from __future__ import annotations

import os
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO, Callable, Union

__all__ = ["atomic_write"]


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the umask (mkstemp's files are 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable, where the platform and file system allow it."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory: the rename is then as durable as they make it
    finally:
        os.close(fd)


def atomic_write(path: Union[str, Path], write: Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` with what ``write(file)`` writes, atomically.

    ``write`` fills a fresh temporary file in the same directory (made by ``mkstemp``, so no link
    planted at a predictable name can redirect it), which is flushed, fsynced and renamed over
    ``path``; a link at ``path`` itself is replaced, not followed. Readers see the old file or the
    whole new one; on any failure the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fchmod(file.fileno(), _new_file_mode())
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)
