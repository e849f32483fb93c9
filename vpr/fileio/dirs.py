"""Folders vpr writes: the ownership marker, the one-writer lock, the refusals of a path that is not vpr's, and
`atomic_dir`, which swaps a complete new output in for the old one and cleans up only its own leftovers."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vpr.errors import OutputError
from vpr.fileio.files import disk_full_errors, normal_mode, os_error

log = logging.getLogger(__name__)
MARKER = ".vpr-owned"


def write_marker(directory: Path, kind: str, target: str | None = None) -> None:
    """Mark `directory` as written by vpr (`kind`: index, cache, run, or tmp: a temporary of the output
    named `target`, which alone may be cleaned up as a leftover)."""
    from vpr import __version__

    marker = Path(directory) / MARKER
    tmp = marker.with_name(f"{MARKER}.tmp-{os.getpid()}")
    data = {"written_by": "vpr", "kind": kind, "vpr_version": __version__, **({"target": target} if target else {})}
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, marker)  # never a half-written marker, whenever a kill lands


def make_owned_dir(path: Path, kind: str, what: str, fix: str) -> None:
    """Create `path` if needed and mark it as vpr's `kind`; an unwritable location is a one-line error."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        if marker_kind(path) != kind:
            write_marker(path, kind)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create the {what} ({exc.strerror}); {fix}") from exc


def _marker(directory: Path) -> dict | None:
    """`directory`'s vpr marker as a dict, or None when it has no valid marker (links are not followed)."""
    path = Path(directory) / MARKER
    try:
        if path.is_symlink() or not path.is_file():
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and data.get("written_by") == "vpr" else None


def marker_kind(directory: Path) -> str | None:
    """The kind recorded in `directory`'s vpr marker, or None when it has no valid marker."""
    data = _marker(directory)
    kind = None if data is None else data.get("kind")
    return kind if isinstance(kind, str) else None


@contextmanager
def output_lock(path: Path, *, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive OS lock on `path` (through `.NAME.lock` beside it).

    While another process holds it: wait for it (`wait`), or refuse with an `OutputError`.
    """
    path = Path(path)
    lock_path = path.parent / f".{path.name}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)  # a planted link is refused
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(f"{lock_path}: the lock file is a symbolic link, which vpr never makes; remove the link") from exc
        raise os_error(path.parent, exc, "create the output folder or its lock") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise OutputError(f"{path}: another vpr process is writing here; wait for it to finish or choose another path") from None
            log.warning("%s: another vpr process is writing here; waiting for it to finish", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock; the lock file stays (deleting it would race)


def check_separate(out: Path, inputs: Iterable[Path], option: str = "`out`") -> None:
    """Refuse an output that is, contains or lies inside an input folder, or that is/contains an input file."""
    target = Path(os.path.realpath(out))
    for item in inputs:
        source = Path(os.path.realpath(item))
        inside = source in target.parents or source == target
        contains = target in source.parents
        if inside or contains:
            relation = "is" if source == target else "lies inside" if inside else "contains"
            raise OutputError(
                f"{out}: {option} {relation} the input {item}; writing there could delete your files; choose a path outside it"
            )
    cwd = Path(os.getcwd())
    if target == cwd or target in cwd.parents:
        raise OutputError(f"{out}: {option} is the current folder or one of its parents; give a new folder name, e.g. {option} indexes/NAME")


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


def remove_tree(path: Path) -> None:
    """Delete a directory vpr made (read-only entries included); never follows links out of it."""

    def make_writable(function, name, exc_info) -> None:
        if isinstance(exc_info[1], PermissionError):
            os.chmod(os.path.dirname(name), stat.S_IRWXU)
            function(name)
        else:
            raise exc_info[1]

    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return
    for name in os.listdir(path):  # the marker goes last: a kill midway leaves a folder that is still cleanable
        entry = path / name
        if name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, onerror=make_writable)
        else:
            entry.unlink()
    (path / MARKER).unlink(missing_ok=True)
    path.rmdir()


TEMP_SUFFIX = re.compile(r"\.(tmp|old)-[a-z0-9_]{8}")  # what tempfile.mkdtemp (and the .old- rename of it) names


def _leftovers(path: Path) -> list[Path]:
    """Temporaries of `path` left by a killed vpr run: the exact name shape this kind of run creates
    and a `tmp` marker naming `path`; anything else with a similar name (a user's own index called
    `NAME.old-2023`, a cache, a folder without a marker) is never touched."""
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    candidates = [path.parent / name for name in names
                  if name.startswith(path.name) and TEMP_SUFFIX.fullmatch(name[len(path.name):])]
    return [c for c in candidates if c.is_dir() and not c.is_symlink() and _is_temporary_of(c, path.name)]


def _is_temporary_of(directory: Path, target: str) -> bool:
    data = _marker(directory)
    return data is not None and data.get("kind") == "tmp" and data.get("target") == target


def _retire(directory: Path, target: str) -> None:
    """Re-mark a directory that held the previous output as a temporary of `target`, so that a kill
    before it is deleted leaves a leftover the next run may clean (a kill before this line leaves it
    marked as what it was: kept, never deleted)."""
    write_marker(directory, "tmp", target)


@contextmanager
def atomic_dir(path: Path, *, kind: str, foreign: Callable[[Path], list[str]], option: str = "`out`") -> Iterator[Path]:
    """Yield an empty marked temporary directory next to `path`; on success swap it in for `path`.

    `path` may be missing, an empty directory, or a directory in which `foreign` finds nothing that
    vpr did not write; anything else is refused before any work. The caller holds `output_lock(path)`. An existing
    `path` is exchanged atomically with the new directory (Linux), so readers see either the
    complete old directory or the complete new one; the old one is then deleted.
    """
    path = Path(path)
    check_replaceable_dir(path, foreign, option)
    for stale in _leftovers(path):
        remove_tree(stale)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=path.parent))
    except OSError as exc:
        raise os_error(path.parent, exc, "create a folder") from exc
    try:
        write_marker(tmp, "tmp", path.name)
        normal_mode(tmp, directory=True)
        with disk_full_errors(path, inside=tmp):
            yield tmp
        check_replaceable_dir(path, foreign, option)  # nothing of the user's appeared meanwhile
        write_marker(tmp, kind)
        if not path.exists():
            os.replace(tmp, path)
        elif _exchange(tmp, path):
            _retire(tmp, path.name)
        else:
            old = tmp.with_name(path.name + ".old-" + tmp.name[-8:])
            os.replace(path, old)
            _retire(old, path.name)
            os.replace(tmp, path)
            tmp = old
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC):
            raise os_error(path, exc, "write the output") from exc
        raise
    finally:
        if tmp.exists():
            remove_tree(tmp)


def check_replaceable_dir(path: Path, foreign: Callable[[Path], list[str]], option: str) -> None:
    """Refuse an output directory path that is a file, a link, or holds entries vpr did not write.

    `foreign(path)` lists the entries of an existing non-empty directory that make it not vpr's own.
    """
    if path.is_symlink():
        raise OutputError(f"{path}: {option} is a symbolic link; give the real folder or a new name")
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputError(f"{path}: {option} names an existing file; give a folder name that is free or a vpr output")
    try:
        empty = not os.listdir(path)
    except OSError as exc:
        raise os_error(path, exc, "read the folder") from exc
    others = [] if empty else sorted(foreign(path))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise OutputError(
            f"{path}: {option} is a folder holding files vpr did not write ({shown}); choose an empty or new folder, "
            "or move your files away yourself"
        )
