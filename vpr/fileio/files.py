"""Files vpr writes: atomically (a temporary sibling renamed into place), with a full disk said in one line and
the previous file left whole, HDF5 that survives a failed write, PNGs tagged as vpr's, strict JSON."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from vpr.errors import OutputError

if TYPE_CHECKING:
    import h5py


def umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_mode(path: Path, directory: bool) -> None:
    """Give a path made by mkstemp/mkdtemp the permissions a plain open()/mkdir() would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def os_error(path: Path, exc: OSError, what: str) -> OutputError:
    """An OS error while writing `path`, as one line that says what failed and why."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return OutputError(f"{path}: cannot {what} ({reason.lower()}); choose a writable location")


PNG_SOFTWARE = "vpr"


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
        raise os_error(path, exc, "write") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with disk_full_errors(path):
            normal_mode(tmp, directory=False)
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


FILE_TAG = "user.vpr"  # the user extended attribute that records which vpr output a plain-text file is


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's content, read in 1 MiB blocks (manifests, ownership tags)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tag_file(path: Path, kind: str) -> bool:
    """Record in `path`'s extended attribute `user.vpr` that vpr wrote it as `kind`, with its content's SHA-256 (a
    file edited since is no longer vpr's); False where the filesystem or platform keeps no such attributes."""
    try:
        os.setxattr(path, FILE_TAG, f"{kind} sha256={file_sha256(path)}".encode())
    except (OSError, AttributeError):
        return False
    return True


@contextmanager
def tagged_file(path: Path, kind: str) -> Iterator[Path]:
    """`atomic_file` whose result carries `tag_file`'s attribute for `kind`, set before it is renamed into place."""
    with atomic_file(path) as tmp:
        yield tmp
        tag_file(tmp, kind)


def is_tagged_file(path: Path, kind: str) -> bool:
    """Whether `path` carries vpr's `tag_file` attribute for `kind` and its content is still what vpr wrote."""
    try:
        tag = os.getxattr(path, FILE_TAG).decode()
        return tag == f"{kind} sha256={file_sha256(path)}"
    except (OSError, AttributeError, UnicodeDecodeError):
        return False


def keeps_tags(path: Path) -> bool:
    """Whether the filesystem holding the existing `path` keeps user extended attributes (so that a file without
    vpr's tag is known not to be vpr's)."""
    try:
        os.getxattr(path, FILE_TAG)
    except AttributeError:
        return False
    except OSError as exc:
        return exc.errno == errno.ENODATA
    return True
