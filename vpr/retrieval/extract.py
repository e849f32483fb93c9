"""Batched descriptor extraction with a DataLoader, resumable through an HDF5 cache.

The cache is keyed by image path, size and modification time and tied to the model's fingerprint,
so a rerun after a kill (or after adding images) only computes what is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vpr.data.images import image_to_tensor, load_rgb, normalize_batch
from vpr.errors import ImageError
from vpr.models.checkpoints import model_fingerprint
from vpr.models.model import VPRModel

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


class ImageFiles(Dataset):
    """Reads images as uint8 tensors of the model's input size; a bad file yields its error text."""

    def __init__(self, paths: list[Path], input_size: tuple[int, int]) -> None:
        self.paths = paths
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            return image_to_tensor(load_rgb(self.paths[i]), self.input_size), i, ""
        except ImageError as exc:
            return torch.zeros(3, *self.input_size, dtype=torch.uint8), i, str(exc)


@dataclass
class Extraction:
    """Descriptors of the readable images (in input order), their indices, and what was skipped."""

    descriptors: np.ndarray
    kept: np.ndarray
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    reused: int = 0


def file_key(path: Path) -> str:
    """Cache key of an image file: path, size and mtime, so a changed file is recomputed."""
    stat = Path(path).stat()
    return f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


class DescriptorCache:
    """Append-only HDF5 store of descriptors keyed by `file_key`; unreadable files start afresh."""

    def __init__(self, path: Path, fingerprint: str, dim: int) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.dim = dim
        self.index: dict[str, int] = {}
        self._file = self._open()

    def _open(self) -> h5py.File:
        if self.path.exists():
            try:
                f = h5py.File(self.path, "a")
                count = int(f.attrs["count"])
                if f.attrs["fingerprint"] != self.fingerprint or f["descriptors"].shape[1] != self.dim:
                    raise ValueError("built by another model")
                keys = f["keys"][:count].astype(str)
                self.index = {k: i for i, k in enumerate(keys)}
                return f
            except Exception as exc:  # corrupt (killed mid-write) or another model: start over
                log.warning("descriptor cache %s unusable (%s); rebuilding it", self.path, exc)
                try:
                    f.close()
                except Exception:
                    pass
                self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(self.path, "w")
        f.attrs["fingerprint"] = self.fingerprint
        f.attrs["count"] = 0
        f.create_dataset("descriptors", shape=(0, self.dim), maxshape=(None, self.dim), dtype="f4", chunks=(256, self.dim))
        f.create_dataset("keys", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(256,))
        return f

    def get(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(positions in `keys` found in the cache, their descriptors)."""
        found = [(i, self.index[k]) for i, k in enumerate(keys) if k in self.index]
        if not found:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        pos, rows = map(np.array, zip(*found))
        order = np.argsort(rows)
        data = self._file["descriptors"][np.sort(rows)]
        out = np.empty_like(data)
        out[order] = data
        return pos.astype(np.int64), out

    def append(self, keys: list[str], descriptors: np.ndarray) -> None:
        """Add a batch and flush, so a kill loses at most this batch."""
        count = int(self._file.attrs["count"])
        new = count + len(keys)
        self._file["descriptors"].resize((new, self.dim))
        self._file["keys"].resize((new,))
        self._file["descriptors"][count:new] = descriptors
        self._file["keys"][count:new] = keys
        self._file.flush()
        self._file.attrs["count"] = new
        self._file.flush()
        self.index.update({k: count + i for i, k in enumerate(keys)})

    def close(self) -> None:
        self._file.close()


@torch.inference_mode()
def embed_batch(model: VPRModel, batch_uint8: torch.Tensor, device: torch.device, amp: bool = False) -> torch.Tensor:
    """Normalise a uint8 batch on `device` and return float32 descriptors on the CPU."""
    batch = batch_uint8.to(device, non_blocking=True)
    images = normalize_batch(batch, model.config.mean, model.config.std).contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    with autocast:
        descriptors = model(images)
    return torch.nn.functional.normalize(descriptors.float(), dim=1).cpu()


def extract_descriptors(
    model: VPRModel,
    paths: list[Path],
    *,
    batch_size: int = 32,
    num_workers: int = 2,
    device: str = "cpu",
    amp: bool = False,
    cache: Path | None = None,
    skip_bad: bool = False,
    progress: Progress | None = None,
) -> Extraction:
    """Compute L2-normalised descriptors of `paths`, reusing and extending `cache` when given.

    A bad image raises its `ImageError` unless `skip_bad`, which records it in `skipped` instead.
    """
    dev = torch.device(device)
    model = model.to(dev).eval().to(memory_format=torch.channels_last)
    dim = model.config.descriptor_dim
    out = np.zeros((len(paths), dim), dtype=np.float32)
    ok = np.ones(len(paths), dtype=bool)
    skipped: list[tuple[Path, str]] = []
    store = DescriptorCache(cache, model_fingerprint(model), dim) if cache is not None else None
    try:
        keys = [file_key(p) if p.is_file() else f"{p}|missing" for p in paths]
        todo = np.arange(len(paths))
        reused = 0
        if store is not None:
            pos, cached = store.get(keys)
            out[pos] = cached
            todo = np.setdiff1d(todo, pos)
            reused = len(pos)
        done = reused
        if progress:
            progress(done, len(paths))
        loader = DataLoader(
            ImageFiles([paths[i] for i in todo], model.config.input_size),
            batch_size=batch_size, shuffle=False, num_workers=num_workers if len(todo) > batch_size else 0,
            pin_memory=dev.type == "cuda", persistent_workers=False,
        )
        for images, local, errors in loader:
            rows = todo[local.numpy()]
            bad = [j for j, e in enumerate(errors) if e]
            for j in bad:
                if not skip_bad:
                    raise ImageError(errors[j])
                skipped.append((paths[rows[j]], errors[j]))
                ok[rows[j]] = False
            good = np.array([j for j in range(len(rows)) if j not in set(bad)], dtype=np.int64)
            if len(good):
                desc = embed_batch(model, images[good], dev, amp).numpy()
                out[rows[good]] = desc
                if store is not None:
                    store.append([keys[r] for r in rows[good]], desc)
            done += len(rows)
            if progress:
                progress(done, len(paths))
    finally:
        if store is not None:
            store.close()
    kept = np.flatnonzero(ok)
    return Extraction(descriptors=out[kept], kept=kept, skipped=skipped, reused=reused)
