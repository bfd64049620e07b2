"""Output files of ``lejepa-kernels pretrain``: checked before the run, written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..atomic_file import atomic_write
from .options import UsageError

__all__ = ["atomic_write", "check_output_path"]


def check_output_path(path: str, option: str) -> None:
    """Fail at once, in one line naming ``option``, when ``path`` cannot be written: it is a
    directory, or its directory can neither be created nor written in. Creates that directory."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{option} {path}: is a directory; give a file path")
    directory = target.parent
    existing = next((p for p in (directory, *directory.parents) if p.exists()), directory)
    if not existing.is_dir():
        raise UsageError(f"{option} {path}: {existing} is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as err:
        raise UsageError(f"{option} {path}: cannot create a file in {directory} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)
