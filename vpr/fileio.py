"""Output-path safety: vpr deletes or replaces only what it can prove it wrote.

- Every directory vpr creates (index, descriptor cache, training run, temporaries) holds a marker
  file `.vpr-owned` naming what it is; clean-up of leftovers deletes a sibling only when it is a
  temporary of this very output: its name has the exact shape a run creates (`NAME.tmp-XXXXXXXX`,
  `NAME.old-XXXXXXXX`: no pattern expansion) and its marker says `tmp` for `NAME`. A complete index,
  cache or run never carries that marker, whatever its name.
- Outputs are written to a temporary sibling and renamed into place, so a kill at any moment leaves
  either the old complete file/directory or the new complete one.
- One writer per output at a time: an OS file lock (`flock`) on a hidden sibling `.NAME.lock`; a
  second process waits for the first.
- New files and directories get the usual permissions of the user's umask, not mkstemp's 0600/0700.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import math
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from vpr.errors import OutputError

if TYPE_CHECKING:
    import h5py

log = logging.getLogger(__name__)
MARKER = ".vpr-owned"
PNG_SOFTWARE = "vpr"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_mode(path: Path, directory: bool) -> None:
    """Give a path made by mkstemp/mkdtemp the permissions a plain open()/mkdir() would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


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


def _os_error(path: Path, exc: OSError, what: str) -> OutputError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return OutputError(f"{path}: cannot {what} ({reason.lower()}); choose a writable location")


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
        raise _os_error(path.parent, exc, "create the output folder or its lock") from exc
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


def save_png(image: Image.Image, path: Path, option: str) -> None:
    """Write a PNG atomically, tagged as vpr's; an existing file is replaced only when vpr wrote it."""
    check_replaceable_file(path, is_vpr_png, "PNG", option)
    info = PngInfo()
    info.add_text("Software", PNG_SOFTWARE)
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def is_vpr_png(path: Path) -> bool:
    """Whether `path` is a PNG that vpr wrote (its Software text chunk)."""
    try:
        with Image.open(path) as img:
            return img.format == "PNG" and img.info.get("Software") == PNG_SOFTWARE
    except (OSError, ValueError, SyntaxError):
        return False


def check_replaceable_file(path: Path, owned: Callable[[Path], bool], what: str, option: str) -> None:
    """Refuse to overwrite an existing file (or anything not a file) that `owned` does not recognise as vpr's."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise OutputError(f"{path}: {option} names an existing {'link' if path.is_symlink() else 'folder'}; give a new file path")
    if path.exists() and not owned(path):
        raise OutputError(f"{path}: exists and is not a {what} written by vpr; choose another {option} path or remove it yourself")


class DiskFull(OutputError):
    """A write that failed because its filesystem is full."""


FULL_BYTES = 1 << 20  # a write that failed with less free space than this on its filesystem failed because it is full


def _caused_by_full_disk(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT anywhere in the exception's chain (h5py and Python say it with errno)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextmanager
def disk_full_errors(path: Path, inside: Path | None = None) -> Iterator[None]:
    """Turn a write to `path` that fails because its filesystem is full into one `OutputError` line, whatever
    library wrote (torch's 'unexpected pos', FAISS's fwrite and h5py's errors say it in their own words):
    ENOSPC in the error's chain, or less than FULL_BYTES free on the filesystem when it failed. Such an error
    for a file inside the temporary folder `inside` is said of `path`."""
    try:
        yield
    except DiskFull as exc:  # a file inside the temporary `inside` (its model.pt): name what the user asked for
        named, _, reason = str(exc).partition(": ")
        if inside is not None and Path(inside) in Path(named).parents:
            raise DiskFull(f"{path}: {reason}") from exc
        raise
    except OutputError:
        raise
    except Exception as exc:
        folder = Path(path)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
        if _caused_by_full_disk(exc) or (free is not None and free < FULL_BYTES):
            shown = "" if free is None else f", {free / 1e6:.1f} MB free"
            raise DiskFull(f"{path}: no space left on the device{shown}; free space there or write elsewhere "
                           "(what was there before is unchanged)") from exc
        raise


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync and rename it onto `path`. A full disk is
    one `OutputError` line and leaves the previous file whole."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as exc:
        raise _os_error(path, exc, "write") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with disk_full_errors(path):
            _normal_mode(tmp, directory=False)
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Sink:
    """The file object under an HDF5 file being written: once a write fails (a full disk) it stops writing
    and lets HDF5 finish and close as if all went well, and the failure is raised when the file is closed.
    HDF5's own writer, or a plain file, leaves HDF5 objects that crash the interpreter (a segmentation fault)
    when they are freed after a failed write."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.failure: OSError | None = None
        self.position = 0

    def write(self, data) -> int:
        if self.failure is None:
            try:
                self.handle.seek(self.position)
                self.handle.write(data)
            except OSError as exc:
                self.failure = exc
        self.position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = offset if whence == 0 else self.position + offset if whence == 1 else self._size() + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, size: int = -1) -> bytes:
        self.handle.seek(self.position)
        data = self.handle.read(size)
        self.position += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def truncate(self, size: int | None = None) -> int:
        if self.failure is None:
            try:
                return self.handle.truncate(self.position if size is None else size)
            except OSError as exc:
                self.failure = exc
        return self.position if size is None else size

    def flush(self) -> None:
        if self.failure is None:
            try:
                self.handle.flush()
            except OSError as exc:
                self.failure = exc

    def _size(self) -> int:
        return os.fstat(self.handle.fileno()).st_size


@contextmanager
def h5_file(path: Path) -> Iterator["h5py.File"]:
    """A new HDF5 file at `path` (a temporary of `atomic_file` or `atomic_dir`) that survives a full disk:
    the write's OSError (ENOSPC) is raised once the file is closed, as one clean error (`_Sink`)."""
    import h5py

    with open(path, "wb+") as handle:
        sink = _Sink(handle)
        with h5py.File(sink, "w") as f:
            yield f
        if sink.failure is not None:
            raise sink.failure


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
        raise _os_error(path.parent, exc, "create a folder") from exc
    try:
        write_marker(tmp, "tmp", path.name)
        _normal_mode(tmp, directory=True)
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
            raise _os_error(path, exc, "write the output") from exc
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
        raise _os_error(path, exc, "read the folder") from exc
    others = [] if empty else sorted(foreign(path))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise OutputError(
            f"{path}: {option} is a folder holding files vpr did not write ({shown}); choose an empty or new folder, "
            "or move your files away yourself"
        )


def json_safe(data: object) -> object:
    """`data` with NaN and infinities replaced by None (JSON null), recursively; tuples become lists, numpy
    scalars and arrays plain numbers and lists."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: json_safe(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(value) for value in data]
    if hasattr(data, "dtype") and hasattr(data, "tolist"):
        return json_safe(data.tolist())
    return data


def to_json(data: object, indent: int | None = 2) -> str:
    """Strict JSON text (no NaN/Infinity, which most parsers refuse), ending in a newline."""
    return json.dumps(json_safe(data), indent=indent, default=str, allow_nan=False) + "\n"


def write_json(path: Path, data: object) -> None:
    """Write `data` as strict JSON to `path`, atomically (the caller has checked it may replace `path`)."""
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(to_json(data))
