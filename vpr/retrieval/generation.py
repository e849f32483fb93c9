"""One generation of an index directory: its files opened through one directory handle, checked as a set.

A rebuild writes a new directory and swaps it in with one rename, then deletes the old one. A reader
that opened the files one by one by path could meet the new manifest and the old model (a false
"rebuild the index") or the old model and the new descriptors (wrong answers without a word). Here
every file is opened relative to one handle on the directory, so all of them belong to the directory
that was at the path when reading began; if the writer deletes that generation before every file is
open, the read starts again on the new one (`read_generation`).

What binds the files of one generation (written by `vpr.retrieval.store.write_index`): the manifest's
random `generation`, repeated in the attributes of database.h5, pca.h5 and local_features.h5, and
its `files` table (size and sha256 of every file, checked in full for the small ones and index.faiss).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

from vpr.errors import IndexFormatError

T = TypeVar("T")
ATTEMPTS = 20  # generations a reader tries before it gives up (each failed try saw one rebuild finish)
HASH_CHUNK = 4 << 20
PROC_FD = Path("/proc/self/fd")


class GenerationGone(Exception):
    """The directory opened was replaced and deleted while its files were being read."""


class Generation:
    """The index directory at `directory` as it is now, held open: files opened by name inside it."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.fd = -1
        self._open: dict[str, int] = {}
        try:
            self.fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise IndexFormatError(f"{directory}: no index here; build one (vpr build-index) into it") from None
        except NotADirectoryError:
            raise IndexFormatError(f"{directory}: not a folder, so no index; build one with `vpr build-index`") from None
        except OSError as exc:
            raise IndexFormatError(f"{directory}: cannot be read ({exc.strerror})") from None

    def has(self, name: str) -> bool:
        """Whether the generation holds a regular file `name` (links are not followed)."""
        try:
            return stat.S_ISREG(os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            self._check_alive()
            return False

    def fd_of(self, name: str) -> int:
        """An open descriptor of the file `name` (opened once, kept while the generation is held)."""
        if name not in self._open:
            try:
                self._open[name] = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
            except FileNotFoundError:
                self._check_alive()
                raise IndexFormatError(f"{self.directory}: incomplete index (missing {name}); rebuild it with `vpr build-index`") from None
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise IndexFormatError(f"{self.directory}/{name}: a symbolic link, which vpr never writes; rebuild the index") from None
                raise IndexFormatError(f"{self.directory}/{name}: cannot be read ({exc.strerror}); rebuild the index") from None
        return self._open[name]

    def path(self, name: str) -> str:
        """A path that opens this generation's `name` even after the directory was swapped or deleted
        (the open descriptor under /proc on Linux; the plain path elsewhere, without that guarantee)."""
        fd = self.fd_of(name)
        return str(PROC_FD / str(fd)) if sys.platform.startswith("linux") and PROC_FD.is_dir() else str(self.directory / name)

    def stream(self, name: str) -> BinaryIO:
        """A new read handle on this generation's `name`, at its start (a file position of its own)."""
        return os.fdopen(os.open(self.path(name), os.O_RDONLY | os.O_CLOEXEC), "rb")

    def size(self, name: str) -> int:
        return os.fstat(self.fd_of(name)).st_size

    def read_bytes(self, name: str) -> bytes:
        with self.stream(name) as handle:
            return handle.read()

    def sha256(self, name: str, sink: Callable[[bytes], None] | None = None) -> str:
        """sha256 of `name`, read in chunks; `sink` sees every chunk (so a reader can parse while hashing)."""
        digest = hashlib.sha256()
        with self.stream(name) as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
                if sink is not None:
                    sink(chunk)
        return digest.hexdigest()

    def _check_alive(self) -> None:
        """Raise `GenerationGone` when the directory was swapped out and deleted meanwhile."""
        try:
            current = os.stat(self.directory)
        except FileNotFoundError:
            current = None
        mine = os.fstat(self.fd)
        if mine.st_nlink == 0 or current is None or (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev):
            raise GenerationGone(str(self.directory))

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass


def read_generation(directory: Path, read: Callable[[Generation], T]) -> T:
    """`read(generation)` on the index at `directory`, tried again on the newer generation when a rebuild
    swapped and deleted the one being read; the generation stays open for what `read` returns (lazy rows)."""
    for _ in range(ATTEMPTS):
        generation = Generation(directory)
        try:
            return read(generation)
        except GenerationGone:
            generation.close()
    raise IndexFormatError(f"{directory}: the index was rebuilt {ATTEMPTS} times while loading; load it again when the builds stop")


def file_record(path: Path) -> dict:
    """A manifest `files` entry: size and sha256 of a file just written."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return {"size": Path(path).stat().st_size, "sha256": digest.hexdigest()}
