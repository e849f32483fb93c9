"""The NetVLAD method (Arandjelovic et al. 2016): cluster init, mined triplets, PCA-whitening at the end.

A new run clusters local features to initialise the head (`netvlad_init`). Each epoch shuffles the
training queries and takes them in chunks of `cache_refresh`: the current model describes the
database (all of it, or a random part with `mining_subset`) and the chunk's queries, the `Miner`
builds tuples in the main process, and DataLoader workers only decode their images. The run itself
(validation, checkpoints, resume, log) is `vpr.training.loop.train`. At the end a whitening PCA is
fitted on training database descriptors of the best weights and stored in `best.pt`, so
`vpr build-index --checkpoint best.pt` applies it.

Under torchrun every rank describes its share of each cache refresh and gathers the rest, so every
rank mines the same tuples (and keeps the same memory); each step's tuples are then shared by the
ranks, the model in DistributedDataParallel, the loss weighted so the step equals a single
process's. Clustering and the whitening run on rank 0 (the others reuse its clusters cache).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from vpr import distributed
from vpr.data.datasets import GeoImageSet, load_split
from vpr.data.images import normalize_batch
from vpr.errors import LabelError
from vpr.fileio import check_separate
from vpr.models.checkpoints import load_checkpoint, load_payload, save_checkpoint
from vpr.models.model import VPRModel, build_model
from vpr.models.pca import PCA, fit_pca
from vpr.training.config import NetVLADConfig
from vpr.retrieval.extract import Progress, extract_descriptors
from vpr.training.loop import Method, Phase, TrainProgress, TrainResult, first_error, rank0_first, parallel, train, trainable
from vpr.training.run import RunDir
from vpr.training.mining import FeatureCache, Miner, Triplet, tuple_sets
from vpr.training.netvlad_init import Clusters, init_netvlad
from vpr.training.triplet import TupleImages, collate_tuples, triplet_hinges

log = logging.getLogger(__name__)
OPTIMIZERS = ("sgd", "adam")
DEFAULT_LR = 1e-4  # pytorch-NetVlad's; also the best of 1e-5 / 1e-4 / 1e-3 from random init on the synthetic city
SGD_WEIGHT_DECAY = 1e-3  # pytorch-NetVlad's, for SGD; its Adam has none


def initial_model(cfg: NetVLADConfig, database: GeoImageSet, progress: Progress | None = None) -> tuple[VPRModel, Clusters]:
    """The untrained model: seeded backbone, NetVLAD centroids and alpha from clustered local features."""
    model = build_model(cfg.model_config(), pretrained=cfg.pretrained, seed=cfg.seed)
    cache = Path(cfg.clusters_cache) if cfg.clusters_cache is not None else Path(cfg.out) / "clusters.h5"
    check_separate(cache, database.input_folders(), "`clusters_cache`")
    clusters = init_netvlad(
        model, database.paths, cache=cache, num_images=cfg.init_images, per_image=cfg.init_per_image, seed=cfg.seed,
        iterations=cfg.kmeans_iterations, options=cfg.extract_options(), progress=progress,
    )
    return model, clusters


def build_optimizer(cfg: NetVLADConfig, params: list[torch.nn.Parameter]) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    """SGD (momentum) or Adam over `params`, with the reference's step decay every `lr_step` epochs."""
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)


def fit_whitening(model: VPRModel, database: GeoImageSet, cfg: NetVLADConfig, progress: Progress | None = None) -> PCA | None:
    """NetVLAD's PCA-whitening, fitted on training database descriptors; None when `pca_dim` is 0."""
    if cfg.pca_dim == 0:
        return None
    descriptors = extract_descriptors(model, database.paths, cfg.extract_options(), progress=progress).descriptors
    dim = min(cfg.pca_dim, descriptors.shape[1], len(descriptors) - 1)
    if dim < 1:
        log.warning("too few training database images to fit a PCA; best.pt keeps full descriptors")
        return None
    if dim < cfg.pca_dim:
        log.warning("PCA-whitening to %d dims instead of %d: whitening needs more database images than dims", dim, cfg.pca_dim)
    return fit_pca(descriptors, dim, whiten=True, seed=cfg.seed)


class NetVLADMethod(Method):
    """NetVLAD's part of a run: tuples and the miner's memory, the optimiser and its step schedule."""

    cfg: NetVLADConfig

    def load(self) -> None:
        cfg = self.cfg
        self.database, self.queries = load_split(cfg.dataset, "train")
        for images in (self.database, self.queries):
            images.require_labels("NetVLAD training")
        self.sets = tuple_sets(self.database.utm, self.queries.utm, cfg.pos_radius, cfg.neg_radius)
        if len(self.sets.trainable) == 0:
            raise LabelError(f"{cfg.dataset}: no training query has a database image within {cfg.pos_radius} m; "
                             "check the coordinates or raise `pos_radius`")

    def start(self, run: RunDir, model: VPRModel | None, state: dict | None, phase: Phase) -> None:
        self.clusters: Clusters | None = None
        if model is None:
            model, self.clusters = rank0_first(lambda: initial_model(self.cfg, self.database, phase("clustering local features")))
        self.model = model
        self.miner = Miner(self.sets, len(self.database), self.cfg.mining_config())
        self.optimizer, self.scheduler = build_optimizer(self.cfg, trainable(model, self.cfg))
        self.net = parallel(model, self.cfg)
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.miner.load_state_dict(state["mining"])

    def state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "mining": self.miner.state_dict()}

    def train_epoch(self, epoch: int, phase: Phase) -> dict:
        """Mine and train on one pass over the shuffled queries (or `iterations_per_epoch` steps).

        Sampling depends only on (seed, epoch), so a resumed run draws what the original would."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(self.miner.sets.trainable)
        max_steps = cfg.iterations_per_epoch or np.inf
        stats = {"loss": 0.0, "lr": self.optimizer.param_groups[0]["lr"], "steps": 0, "tuples": 0, "skipped_queries": 0,
                 "images": 0, "mining_seconds": 0.0, "train_seconds": 0.0}
        for start in range(0, len(order), cfg.cache_refresh):
            if stats["steps"] >= max_steps:
                break
            chunk = order[start : start + cfg.cache_refresh]
            tic = time.perf_counter()
            cache = self.refresh_cache(self.miner.cache_plan(chunk, rng), np.sort(chunk), phase("caching features"))
            triplets = self.miner.mine(cache, chunk, rng)
            del cache
            stats["skipped_queries"] += len(chunk) - len(triplets)
            stats["mining_seconds"] += time.perf_counter() - tic
            tic = time.perf_counter()
            self.train_on(triplets[: int(min(len(triplets), (max_steps - stats["steps"]) * cfg.tuples_per_step))],
                          stats, phase("training"))
            stats["train_seconds"] += time.perf_counter() - tic
        self.scheduler.step()
        ranks = distributed.world_size()
        stats["loss"] = float(distributed.all_reduce_mean(torch.tensor(stats["loss"], dtype=torch.float64))) * ranks
        stats["loss"] = stats["loss"] / max(stats["steps"], 1)
        stats["mining_seconds"], stats["train_seconds"] = round(stats["mining_seconds"], 2), round(stats["train_seconds"], 2)
        return stats

    def refresh_cache(self, database_ids: np.ndarray, query_ids: np.ndarray, progress: Progress | None) -> FeatureCache:
        """Describe the planned database images and the chunk's queries with the current model."""
        database = self.describe([self.database.paths[i] for i in database_ids], progress)
        return FeatureCache(database_ids, database, query_ids, self.describe([self.queries.paths[i] for i in query_ids]))

    def describe(self, paths: list[Path], progress: Progress | None = None) -> np.ndarray:
        """Descriptors of `paths` on every rank; each rank describes its share (`distributed.shard`) with
        rank 0's BatchNorm statistics, and the shares are all-gathered as one tensor."""
        distributed.broadcast_buffers(self.model)
        part = distributed.shard(len(paths))
        mine = np.zeros((0, self.model.config.descriptor_dim), dtype=np.float32) if len(part) == 0 else extract_descriptors(
            self.model, [paths[i] for i in part], self.cfg.extract_options(), progress=progress).descriptors
        return distributed.all_gather_rows(mine)

    def train_on(self, triplets: list[Triplet], stats: dict, progress: Progress | None) -> None:
        """Train on mined tuples in their mined order, each step's tuples shared by the ranks; workers only decode images.

        A rank whose share of a step is empty runs the step's first tuple with weight 0, so DDP still syncs."""
        if not triplets:
            return
        cfg, device, ranks = self.cfg, torch.device(self.cfg.device), distributed.world_size()
        steps = [range(s, min(s + cfg.tuples_per_step, len(triplets))) for s in range(0, len(triplets), cfg.tuples_per_step)]
        shares, weights = [], []
        for step in steps:
            part = distributed.shard(len(step))
            shares.append([step[i] for i in part] if len(part) else [step[0]])
            weights.append(ranks / sum(len(triplets[i].negatives) for i in step) if len(part) else 0.0)
        loader = DataLoader(
            TupleImages(triplets, self.database.paths, self.queries.paths, self.model.config.input_size),
            batch_sampler=shares, num_workers=cfg.workers, collate_fn=collate_tuples, pin_memory=device.type == "cuda",
        )
        self.model.train()
        done = 0
        for batch, weight, step in zip(loader, weights, steps):
            first_error(batch.errors)
            x = normalize_batch(batch.images.to(device, non_blocking=True), self.model.config.mean, self.model.config.std)
            with self.precision.autocast():
                descriptors = self.net(x.contiguous(memory_format=torch.channels_last))
            descriptors = descriptors.float()
            hinges = triplet_hinges(descriptors[batch.query.to(device)], descriptors[batch.positive.to(device)],
                                    descriptors[batch.negatives.to(device)], batch.owner.to(device), cfg.margin)
            loss = hinges.sum() * weight  # DDP's mean over ranks: the mean hinge of the whole step
            self.precision.step(loss, [self.optimizer])
            stats["loss"] += float(loss.detach()) / ranks  # summed over ranks at the end of the epoch
            stats["steps"] += 1
            stats["images"] += sum(2 + len(triplets[i].negatives) for i in step)
            done += len(step)
            if progress:
                progress(done, len(triplets))
        stats["tuples"] += len(triplets)
        self.model.eval()

    def finish(self, run: RunDir, epochs_done: int, phase: Phase) -> dict:
        """Fit the PCA-whitening with the best weights and store it in best.pt (rank 0; the others get its figures)."""
        return distributed.broadcast_object(self.whiten(run, phase) if distributed.is_main() else None)

    def whiten(self, run: RunDir, phase: Phase) -> dict:
        """Fit the PCA-whitening with the best weights and store it in best.pt."""
        model, _ = load_checkpoint(run.best)
        pca = fit_whitening(model, self.database, self.cfg, phase("PCA-whitening"))
        save_checkpoint(model, run.best, pca=pca, extra=load_payload(run.best).get("extra") or {})
        clusters = None if self.clusters is None else {
            "alpha": self.clusters.alpha, "features": self.clusters.num_features, "reused": self.clusters.reused}
        return {"pca_dim": None if pca is None else pca.out_dim, "clusters": clusters}


def train_netvlad(config: NetVLADConfig, *, resume: bool = False, progress: TrainProgress | None = None,
                  on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train (or `resume`) a NetVLAD model on the dataset's train split, validating on `val_split`."""
    return train(config, NetVLADMethod, resume=resume, progress=progress, on_epoch=on_epoch)
