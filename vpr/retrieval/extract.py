"""Batched descriptor extraction with a DataLoader, resumable through a descriptor cache.

The cache is keyed by image content (path, size and a hash of the bytes) and tied to the model's
fingerprint, so a rerun after a kill (or after adding images) only computes what is missing, and an
image whose bytes changed is recomputed.

Under torchrun (`vpr.distributed`), `extract_sharded` splits the images over the ranks: each rank
extracts one contiguous block and writes its own cache parts, and rank 0 gathers the blocks.

Speed: DataLoader workers decode and resize while the model runs (`vpr.data.loading`); the model
runs as an inference copy (`vpr.models.inference`: eval, conv+BN folded, channels_last) under
`inference_mode`, optionally with bf16/fp16 autocast. On CUDA, batches come from pinned memory with
non-blocking copies and each batch's descriptors are copied back while the next batch runs; JPEGs
can be decoded on the device (nvJPEG) and resized there in batches (`decode_on_device`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from vpr import distributed
from vpr.data.loading import ImageFiles, JpegFiles, collate_lists, collate_sizes, decode_batch, file_content_key
from vpr.errors import ImageError, VPRError
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


def _open_cache(model: VPRModel, cache: Path, amp: bool) -> DescriptorCache:
    """The descriptor cache at `cache`, tied to the model: the weights are hashed here, once per call
    and only when a cache is used (fp32 and autocast descriptors never mix)."""
    fingerprint = model_fingerprint(model) + ("|amp" if amp else "")
    return DescriptorCache(cache, fingerprint, model.config.descriptor_dim)


def extract_descriptors(
    model: VPRModel,
    paths: list[Path],
    options: ExtractOptions,
    *,
    cache: Path | None = None,
    progress: Progress | None = None,
    spill: Path | None = None,
) -> Extraction:
    """Compute L2-normalised descriptors of `paths` as `options` says, reusing and extending `cache` when given.

    A bad image raises its `ImageError` unless `options.skip_bad`, which records it in `skipped`
    instead. The caller's model is left untouched (an inference copy runs). With `spill` (a folder)
    the descriptors are written to an unnamed file there as they come and returned as a `RowReader`,
    so memory does not grow with the number of images.
    """
    with output_lock(cache) if cache is not None else nullcontext():  # one writer per cache at a time
        store = _open_cache(model, cache, options.amp) if cache is not None else None
        try:
            return _extract(model, paths, options, store, progress, spill)
        finally:
            if store is not None:
                store.close()


def extract_sharded(
    model: VPRModel,
    paths: list[Path],
    options: ExtractOptions,
    *,
    cache: Path | None = None,
    progress: Progress | None = None,
    spill: Path | None = None,
) -> Extraction:
    """`extract_descriptors` with `paths` sharded over the ranks of a distributed run (`vpr.distributed`).

    Each rank extracts its contiguous block into its own cache parts (and, with `spill`, its own spill
    file); rank 0 then holds the whole result (in input order, as one process would compute it: sent
    as tensors in chunks, into a spill file of its own with `spill`) and merges the cache, while every
    other rank gets only its block's. Any rank's error is raised on rank 0, naming the rank (the
    others raise `distributed.Reported`).
    """
    if not distributed.joined():
        return extract_descriptors(model, paths, options, cache=cache, progress=progress, spill=spill)
    block = distributed.shard(len(paths))
    with ExitStack() as stack:
        store = stack.enter_context(_shared_cache(model, cache, options.amp)) if cache is not None else None
        try:
            mine: Extraction | BaseException = _extract(model, [paths[i] for i in block], options, store, progress, spill)
            mine.kept = block[mine.kept]
        except Exception as exc:  # reported to rank 0 first, then raised here
            mine = exc
        if store is not None:
            store.flush()  # before reporting: rank 0 merges what every rank wrote
        summary = mine if isinstance(mine, BaseException) else replace(mine, descriptors=None)
        gathered = distributed.gather_object(summary)
    failure = _failure(gathered) if gathered is not None else None
    if not distributed.broadcast_object(failure is None):  # every rank learns whether the rows travel
        if failure is not None:
            raise failure
        if isinstance(mine, BaseException):
            raise distributed.Reported(str(mine)) from mine
        return mine
    if gathered is None:
        distributed.gather_rows(mine.descriptors, None, None)
        return mine
    counts = [len(part.kept) for part in gathered]
    shape = (sum(counts), model.config.descriptor_dim)
    out = spill_rows(spill, shape) if spill is not None else np.empty(shape, dtype=np.float32)
    distributed.gather_rows(mine.descriptors, counts, out)
    return Extraction(descriptors=RowReader(out, spill) if spill is not None else out,
                      kept=np.concatenate([part.kept for part in gathered]),
                      skipped=[item for part in gathered for item in part.skipped],
                      reused=sum(part.reused for part in gathered))


def _failure(outcomes: list[Extraction | BaseException]) -> VPRError | None:
    """The first rank's error among the gathered outcomes, naming the rank (None when all succeeded)."""
    for rank, outcome in enumerate(outcomes):
        if isinstance(outcome, BaseException):
            kind = type(outcome) if isinstance(outcome, VPRError) else VPRError
            error = kind(f"rank {rank} of {len(outcomes)}: {outcome}")
            error.__cause__ = outcome
            return error
    return None


@contextmanager
def _shared_cache(model: VPRModel, cache: Path, amp: bool) -> Iterator[DescriptorCache]:
    """The cache all ranks write parts into: rank 0 locks and opens it (claims it, drops an unusable one)
    before the others open it; on leaving, rank 0 (after every rank reported) merges all parts."""
    opened: list[DescriptorCache] = []

    @contextmanager
    def lock_and_open() -> Iterator[None]:
        with output_lock(cache):
            opened.append(_open_cache(model, cache, amp))
            yield

    with distributed.main_first(lock_and_open):
        store = opened[0] if opened else _open_cache(model, cache, amp)
        yield store
        if distributed.is_main():
            store.refresh()
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


def _extract(model: VPRModel, paths: list[Path], options: ExtractOptions, store: DescriptorCache | None,
             progress: Progress | None, spill: Path | None = None) -> Extraction:
    """The extraction loop, reusing and extending an open `store`."""
    dev = torch.device(options.device)
    batch_size = options.batch_size
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    fast = inference_model(model, dev)
    runner = compiled(fast, dev) if options.compile else fast
    config = model.config
    autocast_dtype = amp_dtype(dev) if options.amp else None

    def forward(images: torch.Tensor) -> torch.Tensor:
        n = len(images)
        if options.compile and n < batch_size:  # keep the compiled shape: a short batch would compile again
            images = torch.cat([images, images.new_zeros((batch_size - n, *images.shape[1:]))])
        return forward_batch(runner, images, autocast_dtype)[:n]

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
    dataset = (JpegFiles if on_device else ImageFiles)(todo_paths, rule, keyed=store is not None)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False,
        num_workers=options.num_workers if len(todo) > batch_size else 0,
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
                skipped.append((paths[rows[j]], errors[j]))
                ok[rows[j]] = False
            done += len(bad)
            launched = None
            if len(bad) < len(rows):
                good = np.setdiff1d(np.arange(len(rows)), bad)
                images = images if not bad else images[torch.from_numpy(good).to(dev)]
                launched = _HostCopy(rows[good], forward(images))
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
