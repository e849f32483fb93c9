"""Atomic writes: artefacts are written to a temporary sibling and renamed into place.

A kill at any moment leaves either the old complete file/directory or the new complete one.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync and rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary directory next to `path`; on success swap it in for `path`.

    An existing `path` is exchanged atomically with the new directory (Linux), so readers see
    either the complete old directory or the complete new one; the old one is then deleted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (*path.parent.glob(f"{path.name}.tmp-*"), *path.parent.glob(f"{path.name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed earlier run
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if not path.exists():
            os.replace(tmp, path)
        elif not _exchange(tmp, path):
            old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
            os.replace(path, old)
            os.replace(tmp, path)
            tmp = old
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
