"""NetVLAD training (Arandjelovic et al. 2016): cluster init, mined triplets, validation, WPCA.

A new run clusters local features to initialise the head (`netvlad_init`). Each epoch shuffles the
training queries and takes them in chunks of `cache_refresh`: the current model describes the
database (all of it, or a random part with `mining_subset`) and the chunk's queries, the `Miner`
builds tuples in the main process, and DataLoader workers only decode their images. After each
epoch: recall@1/5 on the val split, `last.pt` (everything `--resume` needs) and `best.pt` when R@5
improves. At the end a whitening PCA is fitted on training database descriptors of the best weights
and stored in `best.pt`, so `vpr build-index --checkpoint best.pt` applies it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from vpr.data.datasets import GeoImageSet, load_split
from vpr.data.images import normalize_batch
from vpr.errors import ImageError, LabelError, UsageError
from vpr.models.checkpoints import load_checkpoint, load_payload, save_checkpoint
from vpr.models.model import ModelConfig, VPRModel, build_model
from vpr.models.pca import PCA, fit_pca
from vpr.retrieval.extract import Progress, extract_descriptors
from vpr.training.loop import (
    RunDir, load_training_checkpoint, rng_state, save_training_checkpoint, seed_everything, set_rng_state, validate,
)
from vpr.training.mining import FeatureCache, Miner, MiningConfig, Triplet, tuple_sets
from vpr.training.netvlad_init import Clusters, init_netvlad
from vpr.training.triplet import TupleBatch, TupleImages, collate_tuples, triplet_loss

log = logging.getLogger(__name__)
TrainProgress = Callable[[str, int, int], None]  # (phase, done, total)
OPTIMIZERS = ("sgd", "adam")
DEFAULT_LR = 1e-4  # pytorch-NetVlad's; also the best of 1e-5 / 1e-4 / 1e-3 from random init on the synthetic city


@dataclass
class NetVLADTrainConfig:
    """Every setting of a NetVLAD run; saved as the run's config.json (resume must match it)."""

    dataset: Path
    out: Path
    backbone: str = "resnet18"
    layer: int = 4
    num_clusters: int = 64
    input_size: tuple[int, int] = (240, 320)
    pretrained: str | None = None
    epochs: int = 5
    iterations_per_epoch: int | None = None  # cap on optimiser steps per epoch; None: one pass over the queries
    batch_size: int = 4  # tuples per optimiser step
    cache_refresh: int = 1000  # queries mined per feature-cache refresh
    pos_radius: float = 10.0
    neg_radius: float = 25.0
    margin: float = 0.1
    num_negatives: int = 10
    neg_samples: int = 1000
    mining_subset: int | None = None  # partial mining: database images cached per refresh
    optimizer: str = "adam"
    lr: float = DEFAULT_LR
    momentum: float = 0.9
    weight_decay: float = 0.001
    lr_step: int = 5
    lr_gamma: float = 0.5
    init_images: int = 500
    init_per_image: int = 100
    kmeans_iterations: int = 100
    clusters_cache: Path | None = None  # default: OUT/clusters.h5
    pca_dim: int = 4096  # 0: no PCA-whitening
    val_split: str = "val"
    seed: int = 0
    device: str = "cpu"
    amp: bool = False
    workers: int = 2
    extract_batch_size: int = 32

    def check(self) -> None:
        """Raise `UsageError` for settings that cannot work."""
        positive = {
            "--epochs": self.epochs, "--batch-size": self.batch_size, "--cache-refresh": self.cache_refresh,
            "--negatives": self.num_negatives, "--neg-samples": self.neg_samples, "--lr-step": self.lr_step,
            "--init-images": self.init_images, "--init-per-image": self.init_per_image,
            "--kmeans-iterations": self.kmeans_iterations, "--extract-batch-size": self.extract_batch_size,
        }
        for option, value in positive.items():
            if value < 1:
                raise UsageError(f"{option} {value}: must be at least 1")
        if self.num_clusters < 2:
            raise UsageError(f"--clusters {self.num_clusters}: NetVLAD needs at least 2 clusters")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"--optimizer {self.optimizer}: choose one of {', '.join(OPTIMIZERS)}")
        if self.lr <= 0 or self.margin <= 0 or self.pca_dim < 0 or self.workers < 0:
            raise UsageError("--lr and --margin must be positive; --pca-dim and --workers at least 0")
        if not 0 < self.pos_radius <= self.neg_radius:
            raise UsageError(f"--pos-radius {self.pos_radius} must be positive and at most --neg-radius {self.neg_radius}")
        for option, value in (("--iterations-per-epoch", self.iterations_per_epoch), ("--mining-subset", self.mining_subset)):
            if value is not None and value < 1:
                raise UsageError(f"{option} {value}: must be at least 1 (leave it out for all)")

    @property
    def use_amp(self) -> bool:
        """bf16 autocast, on CUDA only."""
        return self.amp and self.device.startswith("cuda")

    def model_config(self) -> ModelConfig:
        return ModelConfig(backbone=self.backbone, head="netvlad", layer=self.layer, num_clusters=self.num_clusters,
                           input_size=self.input_size)

    def mining_config(self) -> MiningConfig:
        return MiningConfig(margin=self.margin, num_negatives=self.num_negatives, neg_samples=self.neg_samples,
                            subset=self.mining_subset)

    def to_dict(self) -> dict:
        """JSON-friendly form for config.json (without `out`, so a moved run directory still resumes)."""
        data = asdict(self)
        del data["out"]
        data.update(method="netvlad", dataset=str(self.dataset), input_size=list(self.input_size),
                    clusters_cache=None if self.clusters_cache is None else str(self.clusters_cache))
        return data


@dataclass
class TrainResult:
    """Where the run went and how it went: one log record per epoch trained in this call."""

    run_dir: Path
    best: Path
    last: Path
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_recall: dict = field(default_factory=dict)
    pca_dim: int | None = None
    clusters: Clusters | None = None
    seconds: float = 0.0


@dataclass
class TrainingData:
    """The train split (tuples are mined from it) and the val split (recall after each epoch)."""

    database: GeoImageSet
    queries: GeoImageSet
    val_database: GeoImageSet
    val_queries: GeoImageSet


def load_training_data(dataset: Path, val_split: str = "val") -> TrainingData:
    """Train and validation splits of an `@`-named dataset in the VPR-datasets layout, with coordinates."""
    database, queries = load_split(dataset, "train")
    val_database, val_queries = load_split(dataset, val_split)
    for images in (database, queries, val_database, val_queries):
        images.require_labels("NetVLAD training")
    return TrainingData(database, queries, val_database, val_queries)


def _phase(progress: TrainProgress | None, name: str) -> Progress | None:
    return None if progress is None else (lambda done, total: progress(name, done, total))


def initial_model(cfg: NetVLADTrainConfig, database: GeoImageSet, progress: TrainProgress | None = None) -> tuple[VPRModel, Clusters]:
    """The untrained model: seeded backbone, NetVLAD centroids and alpha from clustered local features."""
    model = build_model(cfg.model_config(), pretrained=cfg.pretrained, seed=cfg.seed)
    cache = cfg.clusters_cache if cfg.clusters_cache is not None else Path(cfg.out) / "clusters.h5"
    clusters = init_netvlad(
        model, database.paths, cache=cache, num_images=cfg.init_images, per_image=cfg.init_per_image, seed=cfg.seed,
        iterations=cfg.kmeans_iterations, batch_size=cfg.extract_batch_size, num_workers=cfg.workers,
        device=cfg.device, progress=_phase(progress, "clustering local features"),
    )
    return model, clusters


def build_optimizer(cfg: NetVLADTrainConfig, model: VPRModel) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    """SGD (momentum) or Adam over all weights, with the reference's step decay every `lr_step` epochs."""
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                                           weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)


def refresh_cache(model: VPRModel, data: TrainingData, database_ids: np.ndarray, query_ids: np.ndarray,
                  cfg: NetVLADTrainConfig, progress: Progress | None = None) -> FeatureCache:
    """Describe the planned database images and the chunk's queries with the current model."""
    options = dict(batch_size=cfg.extract_batch_size, num_workers=cfg.workers, device=cfg.device, amp=cfg.use_amp)
    database = extract_descriptors(model, [data.database.paths[i] for i in database_ids], progress=progress, **options)
    queries = extract_descriptors(model, [data.queries.paths[i] for i in query_ids], **options)
    return FeatureCache(database_ids, database.descriptors, query_ids, queries.descriptors)


def train_step(model: VPRModel, optimizer: torch.optim.Optimizer, batch: TupleBatch, cfg: NetVLADTrainConfig) -> float:
    """One optimiser step on a batch of tuples; returns the loss."""
    dev = torch.device(cfg.device)
    x = normalize_batch(batch.images.to(dev, non_blocking=True), model.config.mean, model.config.std)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if cfg.use_amp else nullcontext()
    with autocast:
        descriptors = model(x.contiguous(memory_format=torch.channels_last))
    descriptors = descriptors.float()
    loss = triplet_loss(descriptors[batch.query.to(dev)], descriptors[batch.positive.to(dev)],
                        descriptors[batch.negatives.to(dev)], batch.owner.to(dev), cfg.margin)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def train_epoch(model: VPRModel, optimizer: torch.optim.Optimizer, miner: Miner, data: TrainingData,
                cfg: NetVLADTrainConfig, epoch: int, progress: TrainProgress | None = None) -> dict:
    """Mine and train on one pass over the shuffled queries (or `iterations_per_epoch` steps); returns loss
    and counts. Sampling depends only on (seed, epoch), so a resumed run draws what the original would."""
    rng = np.random.default_rng([cfg.seed, epoch])
    order = rng.permutation(miner.sets.trainable)
    max_steps = cfg.iterations_per_epoch or np.inf
    stats = {"loss": 0.0, "steps": 0, "tuples": 0, "skipped_queries": 0, "images": 0, "mining_s": 0.0, "train_s": 0.0}
    for start in range(0, len(order), cfg.cache_refresh):
        if stats["steps"] >= max_steps:
            break
        chunk = order[start : start + cfg.cache_refresh]
        tic = time.perf_counter()
        database_ids = miner.cache_plan(chunk, rng)
        cache = refresh_cache(model, data, database_ids, np.sort(chunk), cfg,
                              _phase(progress, f"epoch {epoch + 1}: caching features"))
        triplets = miner.mine(cache, chunk, rng)
        del cache
        stats["skipped_queries"] += len(chunk) - len(triplets)
        stats["mining_s"] += time.perf_counter() - tic
        tic = time.perf_counter()
        _train_on(model, optimizer, triplets[: int(min(len(triplets), (max_steps - stats["steps"]) * cfg.batch_size))],
                  data, cfg, stats, _phase(progress, f"epoch {epoch + 1}: training"))
        stats["train_s"] += time.perf_counter() - tic
    stats["loss"] = stats["loss"] / max(stats["steps"], 1)
    stats["mining_s"], stats["train_s"] = round(stats["mining_s"], 2), round(stats["train_s"], 2)
    return stats


def _train_on(model: VPRModel, optimizer: torch.optim.Optimizer, triplets: list[Triplet], data: TrainingData,
              cfg: NetVLADTrainConfig, stats: dict, progress: Progress | None) -> None:
    """Train on mined tuples in their mined order; workers only decode images."""
    if not triplets:
        return
    loader = DataLoader(
        TupleImages(triplets, data.database.paths, data.queries.paths, model.config.input_size),
        batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers, collate_fn=collate_tuples,
        pin_memory=cfg.device.startswith("cuda"),
    )
    model.train()
    done = 0
    for batch in loader:
        if batch.errors:
            raise ImageError(batch.errors[0])
        stats["loss"] += train_step(model, optimizer, batch, cfg)
        stats["steps"] += 1
        stats["images"] += len(batch.images)
        done += len(batch.query)
        if progress:
            progress(done, len(triplets))
    stats["tuples"] += len(triplets)
    model.eval()


def fit_whitening(model: VPRModel, database: GeoImageSet, cfg: NetVLADTrainConfig, progress: Progress | None = None) -> PCA | None:
    """NetVLAD's PCA-whitening, fitted on training database descriptors; None when `pca_dim` is 0."""
    if cfg.pca_dim == 0:
        return None
    descriptors = extract_descriptors(model, database.paths, batch_size=cfg.extract_batch_size, num_workers=cfg.workers,
                                      device=cfg.device, progress=progress).descriptors
    dim = min(cfg.pca_dim, descriptors.shape[1], len(descriptors) - 1)
    if dim < 1:
        log.warning("too few training database images to fit a PCA; best.pt keeps full descriptors")
        return None
    if dim < cfg.pca_dim:
        log.warning("PCA-whitening to %d dims instead of %d: whitening needs more database images than dims", dim, cfg.pca_dim)
    return fit_pca(descriptors, dim, whiten=True, seed=cfg.seed)


def train_netvlad(cfg: NetVLADTrainConfig, *, resume: bool = False, progress: TrainProgress | None = None,
                  on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train (or resume) a NetVLAD run in `cfg.out`; returns the result with one record per epoch."""
    start_time = time.perf_counter()
    cfg.check()
    run = RunDir(Path(cfg.out))
    with run.locked():  # one process per run folder
        run.check(cfg.to_dict(), resume, inputs=[Path(cfg.dataset)])
        data = load_training_data(cfg.dataset, cfg.val_split)
        sets = tuple_sets(data.database.utm, data.queries.utm, cfg.pos_radius, cfg.neg_radius)
        if len(sets.trainable) == 0:
            raise LabelError(f"{cfg.dataset}: no training query has a database image within {cfg.pos_radius} m; "
                             "check the coordinates or raise --pos-radius")
        run.prepare(cfg.to_dict(), resume, inputs=[Path(cfg.dataset)])
        miner = Miner(sets, len(data.database), cfg.mining_config())
        result = TrainResult(run.root, run.best, run.last)
        if resume:
            model, _, state = load_training_checkpoint(run.last)
        else:
            seed_everything(cfg.seed)
            model, result.clusters = initial_model(cfg, data.database, progress)
            state = None
        model = model.to(cfg.device).to(memory_format=torch.channels_last)
        optimizer, scheduler = build_optimizer(cfg, model)
        first_epoch, best = 0, {"epoch": 0, "score": -1.0, "recall": {}}
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            miner.load_state_dict(state["mining"])
            set_rng_state(state["rng"])
            first_epoch, best = int(state["epoch"]), dict(state["best"])
        for epoch in range(first_epoch, cfg.epochs):
            tic = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            stats = train_epoch(model, optimizer, miner, data, cfg, epoch, progress)
            scheduler.step()
            recalls = validate(model, data.val_database, data.val_queries, ns=(1, 5), batch_size=cfg.extract_batch_size,
                               num_workers=cfg.workers, device=cfg.device, amp=cfg.use_amp,
                               progress=_phase(progress, f"epoch {epoch + 1}: validation"))
            recall = {f"R@{n}": round(v, 2) for n, v in recalls.items()}
            improved = recalls[5] > best["score"]
            if improved:
                best = {"epoch": epoch + 1, "score": float(recalls[5]), "recall": recall}
                save_checkpoint(model, run.best, extra={"epoch": epoch + 1, "recall": recall})
            training = {"epoch": epoch + 1, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "mining": miner.state_dict(), "rng": rng_state(), "best": best}
            save_training_checkpoint(run.last, model, training)
            seconds = time.perf_counter() - tic
            record = {"epoch": epoch + 1, "lr": lr, **stats, "recall": recall, "best": improved, "seconds": round(seconds, 2),
                      "images_per_s": round(stats["images"] / stats["train_s"], 2) if stats["train_s"] else 0.0}
            run.append_log(record)
            result.history.append(record)
            if on_epoch:
                on_epoch(record)
        result.best_epoch, result.best_recall = best["epoch"], best["recall"]
        result.pca_dim = _whiten_best(run, data, cfg, progress)
        result.seconds = time.perf_counter() - start_time
        return result


def _whiten_best(run: RunDir, data: TrainingData, cfg: NetVLADTrainConfig, progress: TrainProgress | None) -> int | None:
    """Fit the PCA-whitening with the best weights and store it in best.pt; returns its dimension."""
    model, _ = load_checkpoint(run.best)
    pca = fit_whitening(model, data.database, cfg, _phase(progress, "PCA-whitening"))
    extra = load_payload(run.best).get("extra") or {}
    save_checkpoint(model, run.best, pca=pca, extra=extra)
    return None if pca is None else pca.out_dim
