"""Extraction over the ranks of a torchrun job (`vpr.distributed`): each rank extracts one contiguous block of
the images with `vpr.retrieval.extract`'s loop and writes its own cache parts; rank 0 gathers the blocks, in
input order, as one process would have computed them. In a plain process it is `extract_descriptors`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from vpr import distributed
from vpr.errors import VPRError
from vpr.fileio import output_lock
from vpr.models.model import VPRModel
from vpr.retrieval.cache import DescriptorCache
from vpr.retrieval.extract import Describer, Extraction, Progress, _extract, _open_cache, extract_descriptors
from vpr.retrieval.options import ExtractOptions
from vpr.retrieval.rows import RowReader, spill_rows


def extract_sharded(
    model: VPRModel | Describer,
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
    describer = model if isinstance(model, Describer) else Describer(model, options)
    model = describer.model
    with ExitStack() as stack:
        store = stack.enter_context(_shared_cache(model, cache, options)) if cache is not None else None
        try:
            mine: Extraction | BaseException = _extract(describer, [paths[i] for i in block], options, store, progress, spill)
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
def _shared_cache(model: VPRModel, cache: Path, options: ExtractOptions) -> Iterator[DescriptorCache]:
    """The cache all ranks write parts into: rank 0 locks and opens it (claims it, drops an unusable one)
    before the others open it; on leaving, rank 0 (after every rank reported) merges all parts."""
    opened: list[DescriptorCache] = []

    @contextmanager
    def lock_and_open() -> Iterator[None]:
        with output_lock(cache):
            opened.append(_open_cache(model, cache, options))
            yield

    with distributed.main_first(lock_and_open):
        store = opened[0] if opened else _open_cache(model, cache, options)
        yield store
        if distributed.is_main():
            store.refresh()
            store.close()
