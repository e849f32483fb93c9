"""Batched descriptor extraction with a DataLoader, resumable through a descriptor cache.

The cache is keyed by image content (path, size and a hash of the bytes) and tied to the model's
fingerprint, so a rerun after a kill (or after adding images) only computes what is missing, and an
image whose bytes changed is recomputed.

Under torchrun, `vpr.retrieval.sharded` splits the images over the ranks and runs this loop on each.

Speed: DataLoader workers decode and resize while the model runs (`vpr.data.loading`); the model
runs as an inference copy (`vpr.models.inference`: eval, conv+BN folded, channels_last) under
`inference_mode`, optionally with bf16/fp16 autocast. On CUDA, batches come from pinned memory with
non-blocking copies and each batch's descriptors are copied back while the next batch runs; JPEGs
can be decoded on the device (nvJPEG) and resized there in batches (`decode_on_device`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from vpr.data.images import ImageItem
from vpr.data.loading import (
    ImageFiles, JpegFiles, collate_lists, collate_sizes, decode_batch, file_content_key, same_size_groups,
)
from vpr.errors import ImageError, UsageError, plain
from vpr.fileio import output_lock
from vpr.models.checkpoints import model_fingerprint
from vpr.models.inference import amp_dtype, compiled, forward_batch, inference_model
from vpr.models.model import VPRModel
from vpr.retrieval.cache import DescriptorCache
from vpr.retrieval.options import ExtractOptions
from vpr.retrieval.rows import RowReader, spill_rows

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
HASH_THREADS = 4  # files read and hashed at once to find cached rows (hashlib and reads release the GIL)


@dataclass
class Extraction:
    """Descriptors of the readable images (in input order), their indices, and what was skipped.

    `descriptors` is an array, or a `RowReader` over a spill file when extraction spilled to disk."""

    descriptors: np.ndarray | RowReader
    kept: np.ndarray
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    reused: int = 0


class _HostCopy:
    """Descriptors on their way to the host: on CUDA a non-blocking copy into pinned memory."""

    def __init__(self, rows: np.ndarray, descriptors: torch.Tensor) -> None:
        self.rows = rows
        self.event = None
        if descriptors.is_cuda:
            self.host = torch.empty(descriptors.shape, dtype=descriptors.dtype, pin_memory=True)
            self.host.copy_(descriptors, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = descriptors

    def numpy(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()


class Describer:
    """A model ready to describe images on one device, for every caller alike (index builds, evaluation,
    training's validation, `Index.query`, `vpr serve`): its inference copy (eval, conv+BN folded,
    channels_last, optionally compiled), made once, and its autocast dtype. The caller's model is untouched."""

    def __init__(self, model: VPRModel, options: ExtractOptions) -> None:
        self.model = model
        self.device = torch.device(options.device)
        self.batch_size, self.compile = options.batch_size, options.compile
        self.dtype = amp_dtype(self.device) if options.amp else None
        self.graph = None
        if options.backend != "torch":  # the exported graph on ONNX Runtime or OpenVINO (vpr.deploy)
            from vpr.deploy.backends import GraphRunner

            self.graph = GraphRunner(model, options.backend, amp=options.amp)
            return
        self.fast = inference_model(model, self.device)
        self.runner = compiled(self.fast, self.device) if options.compile else self.fast

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unit descriptors (float32, on the device) of a batch of model inputs already on the device."""
        if self.graph is not None:
            return self.graph(images)
        n = len(images)
        if self.compile and n < self.batch_size:  # keep the compiled shape: a short batch would compile again
            images = torch.cat([images, images.new_zeros((self.batch_size - n, *images.shape[1:]))])
        return forward_batch(self.runner, images, self.dtype)[:n]

    def inputs(self, tensors: Sequence[torch.Tensor]) -> np.ndarray:
        """Descriptors of model inputs made by `vpr.data.images.preprocess` (as `vpr serve` prepares uploads):
        one forward pass per input size."""
        tensors = list(tensors)
        out = np.zeros((len(tensors), self.model.config.descriptor_dim), dtype=np.float32)
        for rows in same_size_groups(tensors):
            stack = torch.stack([tensors[i] for i in rows]).to(self.device, non_blocking=True)
            out[rows] = self.forward(stack).cpu().numpy()
        return out


def _open_cache(model: VPRModel, cache: Path, options: ExtractOptions) -> DescriptorCache:
    """The descriptor cache at `cache`, tied to the model: the weights are hashed here, once per call
    and only when a cache is used (fp32, autocast and other backends' descriptors never mix)."""
    fingerprint = model_fingerprint(model) + ("|amp" if options.amp else "")
    if options.backend != "torch":
        fingerprint += f"|{options.backend}"
    return DescriptorCache(cache, fingerprint, model.config.descriptor_dim)


def extract_descriptors(
    model: VPRModel | Describer,
    images: Sequence[ImageItem],
    options: ExtractOptions,
    *,
    cache: Path | None = None,
    progress: Progress | None = None,
    spill: Path | None = None,
    names: Sequence[str] | None = None,
) -> Extraction:
    """Compute L2-normalised descriptors of `images` as `options` says, reusing and extending `cache` when given.

    `images` are files (paths) or images in memory (PIL images, uint8 arrays, the bytes of image files;
    `names` names them in errors); either way they are read, resized and described by the same code. A bad
    image raises its `ImageError` unless `options.skip_bad`, which records it in `skipped` instead. `model`
    may be a `Describer` made earlier (its inference copy reused). With `spill` (a folder) the descriptors are
    written to an unnamed file there as they come and returned as a `RowReader`, so memory does not grow
    with the number of images.
    """
    describer = model if isinstance(model, Describer) else Describer(model, options)
    with output_lock(cache) if cache is not None else nullcontext():  # one writer per cache at a time
        store = _open_cache(describer.model, cache, options) if cache is not None else None
        try:
            return _extract(describer, list(images), options, store, progress, spill, names)
        finally:
            if store is not None:
                store.close()


def cached_keys(store: DescriptorCache, paths: list[Path]) -> list[str | None]:
    """Content keys of the images the cache has a row for (their bytes read and hashed, a few files at a
    time); None for the others, whose keys come from the read that decodes them."""
    resolved = [str(Path(p).resolve()) for p in paths]
    seen = [i for i, path in enumerate(resolved) if store.knows(path)]
    keys: list[str | None] = [None] * len(paths)
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        for i, key in zip(seen, pool.map(file_content_key, [paths[i] for i in seen])):
            keys[i] = key
    return keys


def _extract(describer: Describer, paths: list[ImageItem], options: ExtractOptions, store: DescriptorCache | None,
             progress: Progress | None, spill: Path | None = None, names: Sequence[str] | None = None) -> Extraction:
    """The extraction loop, reusing and extending an open `store` (files only: images in memory have no key)."""
    dev = describer.device
    batch_size = options.batch_size
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    config = describer.model.config
    in_memory = not all(isinstance(item, (str, os.PathLike)) for item in paths)
    if in_memory and (store is not None or options.decode_on_device):
        raise UsageError("images in memory are described without a descriptor cache or decoding on the device")
    shape = (len(paths), config.descriptor_dim)
    out = spill_rows(spill, shape) if spill is not None else np.zeros(shape, dtype=np.float32)
    ok = np.ones(len(paths), dtype=bool)
    skipped: list[tuple[Path, str]] = []
    keys: list[str | None] = [None] * len(paths)  # content keys: of cached images now, of the others as they are read
    todo = np.arange(len(paths))
    reused = 0
    if store is not None:
        keys = cached_keys(store, paths)
        pos = store.fill(keys, out)
        todo = np.setdiff1d(todo, pos)
        reused = len(pos)
    done = reused
    if progress:
        progress(done, len(paths))
    todo_paths = [paths[i] for i in todo]
    on_device = options.decode_on_device
    rule = config.preprocess
    dataset = (JpegFiles(todo_paths, rule, keyed=store is not None) if on_device else
               ImageFiles(todo_paths, rule, keyed=store is not None, names=None if names is None else [names[i] for i in todo]))
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False,
        num_workers=options.num_workers if len(todo) > batch_size and not in_memory else 0,
        pin_memory=dev.type == "cuda", persistent_workers=False, collate_fn=collate_lists if on_device else collate_sizes,
    )

    def finish(copy_: _HostCopy | None) -> None:
        nonlocal done
        if copy_ is None:
            return
        desc = copy_.numpy()
        out[copy_.rows] = desc
        if store is not None:
            store.append([keys[r] for r in copy_.rows], desc)
        done += len(copy_.rows)
        if progress:
            progress(done, len(paths))

    def size_groups(batch) -> Iterator[tuple[torch.Tensor, np.ndarray, list[str]]]:
        """(images on the device, rows, errors) per image size of a loader batch; the rows' content keys noted."""
        if on_device:
            items, is_jpeg, local, errors, read_keys = batch
            rows = todo[local.numpy()]
            images, decode_errors = decode_batch(items, is_jpeg, [paths[r] for r in rows], rule, dev)
            keys_of(rows, read_keys)
            yield images, rows, [e or d for e, d in zip(errors, decode_errors)]
            return
        for images, local, errors, read_keys in batch:
            keys_of(todo[local.numpy()], read_keys)
            yield images.to(dev, non_blocking=True), todo[local.numpy()], errors

    def keys_of(rows: np.ndarray, read_keys: list[str]) -> None:
        for row, key in zip(rows, read_keys):
            keys[row] = key

    pending: _HostCopy | None = None
    for batch in loader:
        for images, rows, errors in size_groups(batch):
            bad = [j for j, e in enumerate(errors) if e]
            for j in bad:
                if not options.skip_bad:
                    raise ImageError(errors[j])
                skipped.append((paths[rows[j]], plain(errors[j])))
                ok[rows[j]] = False
            done += len(bad)
            launched = None
            if len(bad) < len(rows):
                good = np.setdiff1d(np.arange(len(rows)), bad)
                images = images if not bad else images[torch.from_numpy(good).to(dev)]
                launched = _HostCopy(rows[good], describer.forward(images))
            finish(pending)
            pending = launched
            if dev.type != "cuda":  # nothing to overlap on the CPU: store now, so a kill loses at most this batch
                finish(pending)
                pending = None
    finish(pending)
    kept = np.flatnonzero(ok)
    for start in range(0, len(kept), 4096):  # compact in place (kept[j] >= j): no second copy of the descriptors
        chunk = kept[start:start + 4096]
        out[start:start + len(chunk)] = out[chunk]
    descriptors = RowReader(out.head(len(kept)), spill) if spill is not None else out[:len(kept)]
    return Extraction(descriptors=descriptors, kept=kept, skipped=skipped, reused=reused)
