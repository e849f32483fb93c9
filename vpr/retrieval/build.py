"""The retrieval stages a user runs: build an index from a database, describe query images in its space
(`vpr.retrieval.answer` answers them)."""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from vpr import distributed
from vpr.data.datasets import GeoImageSet
from vpr.errors import UsageError
from vpr.fileio import check_replaceable_dir, check_separate, output_lock
from vpr.models.checkpoints import load_checkpoint
from vpr.models.model import ModelConfig, VPRModel, build_model
from vpr.models.pca import PCA, fit_pca
from vpr.retrieval.cache import check_cache_path
from vpr.retrieval.expansion import augment_database
from vpr.retrieval.extract import Progress
from vpr.retrieval.local_features import (
    LOCAL_FEATURES_FILE, LocalFeatureConfig, extract_local_features, require_opencv, write_local_features,
)
from vpr.retrieval.options import SPILL_BYTES, Expansion, ExtractOptions
from vpr.retrieval.rows import ProjectedRows, project
from vpr.retrieval.sharded import extract_sharded
from vpr.retrieval.store import IndexBundle, check_index_kind, foreign_files, write_index


log = logging.getLogger(__name__)


@dataclass
class BuildReport:
    """What `build_index` did: counts, dimensions, skipped files and where the index went."""

    out_dir: Path
    count: int
    dim: int
    reused: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def load_model(
    checkpoint: Path | None, config: ModelConfig, pretrained: str | None = None, fmt: str | None = None,
) -> tuple[VPRModel, PCA | None]:
    """The model to index with: a checkpoint (ours or a published layout, `fmt` forcing one) when
    given, else `config` built from scratch (seeded)."""
    if checkpoint is not None:
        return load_checkpoint(checkpoint, fmt)
    return build_model(config, pretrained=pretrained, seed=0), None


def build_index(
    database: GeoImageSet,
    out_dir: Path,
    *,
    model: VPRModel,
    model_pca: PCA | None = None,
    pca_dim: int | None = None,
    pca_whiten: bool = False,
    kind: str = "flat",
    options: ExtractOptions,
    cache: Path | None = None,
    progress: Progress | None = None,
    dba: Expansion = Expansion(),
    local_features: LocalFeatureConfig | None = None,
    spill_bytes: int = SPILL_BYTES,
) -> BuildReport:
    """Extract database descriptors as `options` says (`options.skip_bad` leaves unreadable images
    out), fit the optional PCA, augment them (`dba`), extract `local_features` for `--rerank local`,
    and write a self-contained index directory.

    Every check on the output runs before any work: `out_dir` (and `cache`) must lie outside the
    database's folders and be new, empty or a vpr index; one process writes `out_dir` at a time.
    Under torchrun the images are sharded over the ranks (`extract_sharded`); rank 0 alone checks,
    locks and writes the output, and every other rank returns a report of its own share.

    Past `spill_bytes` of descriptors, extraction writes them to an unnamed file next to `out_dir`
    instead of memory (under torchrun every rank spills its block and rank 0 receives all rows into
    its own file), the PCA fits on a sample and the index is written chunk by chunk: memory then holds
    the model, one batch, the PCA sample and the FAISS index, not the database.
    """
    out_dir = Path(out_dir)
    check_index_kind(kind)
    if pca_dim is not None and pca_dim < 1:
        raise UsageError(f"`pca_dim` {pca_dim}: must be at least 1 (omit it to keep full descriptors)")

    def claim_output() -> AbstractContextManager:
        inputs = database.input_folders()
        check_separate(out_dir, inputs)
        if cache is not None:
            check_separate(cache, inputs, "`out`'s descriptor cache")
            check_cache_path(cache)
        check_replaceable_dir(out_dir, foreign_files, "`out`")
        if local_features is not None:
            require_opencv()  # before hours of extraction, not after
        return output_lock(out_dir)

    spill = None
    if len(database) * model.config.descriptor_dim * 4 > spill_bytes:
        spill = out_dir.parent
        spill.mkdir(parents=True, exist_ok=True)
    with distributed.main_first(claim_output):
        extraction = extract_sharded(model, database.paths, options, cache=cache, progress=progress, spill=spill)
        if not distributed.is_main():
            return BuildReport(out_dir, len(extraction.kept), model.config.descriptor_dim, extraction.reused,
                               extraction.skipped)
        if len(extraction.kept) == 0:
            raise UsageError(f"{database.source}: no readable images left to index")
        kept = database.subset(extraction.kept)
        if isinstance(extraction.descriptors, np.ndarray):
            descriptors = project(extraction.descriptors, model_pca, None)
            pca = fit_pca(descriptors, pca_dim, whiten=pca_whiten) if pca_dim else None
            descriptors = project(descriptors, None, pca)
        else:  # spilled: projected chunk by chunk as the index is written
            pca = fit_pca(ProjectedRows(extraction.descriptors, model_pca, None), pca_dim, whiten=pca_whiten) if pca_dim else None
            descriptors = ProjectedRows(extraction.descriptors, model_pca, pca)
            if dba.n:  # DBA averages every descriptor with its neighbours: it needs them all in memory
                descriptors = np.asarray(descriptors)
        descriptors = augment_database(descriptors, dba)
        extras = _index_extras(kept, dba, local_features, progress)
        write_index(
            out_dir, model=model.cpu(), model_pca=model_pca, pca=pca, database=kept, descriptors=descriptors,
            kind=kind, source=str(database.source), skipped=[*database.left_out, *extraction.skipped], extras=extras,
        )
    return BuildReport(out_dir, len(kept), descriptors.shape[1], extraction.reused, [*database.left_out, *extraction.skipped])


def _index_extras(database: GeoImageSet, dba: Expansion, local_features: LocalFeatureConfig | None,
                  progress: Progress | None) -> Callable[[Path, str], dict]:
    """What `write_index` adds to the index: the DBA settings, and the local features file when asked."""
    def write(directory: Path, generation: str) -> dict:
        entries: dict = {"dba": {"n": dba.n, "alpha": dba.alpha} if dba.n else None, "local_features": None}
        if local_features is not None:
            features = extract_local_features(database.paths, local_features, progress=progress)
            write_local_features(directory / LOCAL_FEATURES_FILE, features, generation)
            entries["local_features"] = asdict(local_features)
        return entries

    return write


def cache_dir_for(out_dir: Path) -> Path:
    """Where `build-index --out OUT` keeps its descriptor cache: the sibling `OUT.cache`."""
    out_dir = Path(os.path.abspath(out_dir))
    return out_dir.with_name(out_dir.name + ".cache") if out_dir.name else out_dir / ".cache"


def describe(bundle: IndexBundle, paths: list[Path], options: ExtractOptions,
             progress: Progress | None = None) -> np.ndarray:
    """Query descriptors in the index's space (model forward, then the index's projections), one row
    per path: an unreadable query raises its `ImageError` whatever `options.skip_bad` says. Under
    torchrun the paths are sharded over the ranks: rank 0 gets every row, the others their share's."""
    extraction = extract_sharded(bundle.model, paths, replace(options, skip_bad=False), progress=progress)
    return bundle.project(extraction.descriptors)
