"""The CosPlace method (Berton et al., CVPR 2022): classification over class groups with CosFace.

Each epoch trains on group `epoch % groups` for a fixed number of iterations; a batch samples a
class of the group uniformly, then one of its images. One CosFace classifier per group; only the
current one and its Adam state sit on the device. The run itself (validation, checkpoints, resume,
log) is `vpr.training.loop.train`.

Under torchrun the backbone and head train in DistributedDataParallel and the current classifier's
gradient is averaged over the ranks, so every rank keeps identical classifiers. `batch_size` stays
the global batch: every rank draws the same sample and augmentation numbers and trains on its share
of each step's images, the loss weighted so the step equals a single process's (up to BatchNorm
statistics, which are per rank).

Defaults differ from the paper where the paper assumes an ImageNet-pretrained backbone: from random
init the backbone learns far too slowly at lr 1e-5 with its early layers frozen, so without
`pretrained` the backbone lr is `SCRATCH_LR` and every layer trains. Pass lr=1e-5 and
freeze_early=True (or a pretrained backbone) for the paper's setting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from vpr import distributed
from vpr.data.datasets import load_split_images
from vpr.data.images import normalize_batch
from vpr.errors import UsageError
from vpr.models.model import VPRModel, build_model
from vpr.data.loading import ImageFiles
from vpr.training.augment import augment_batch
from vpr.training.config import CosPlaceConfig
from vpr.training.cosface import CosFaceClassifier, cosface_loss
from vpr.training.cosplace_groups import build_groups
from vpr.training.loop import (
    Method, Phase, TrainProgress, TrainResult, first_error, global_share, rank0_first, parallel, train, trainable,
)
from vpr.training.run import RunDir

log = logging.getLogger(__name__)

PAPER_LR = 1e-5
SCRATCH_LR = 3e-4


def move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Move Adam's moment tensors (not its CPU step counters) to `device`."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                state[key] = value.to(device)


def sample_epoch(
    classes: np.ndarray, images_per_class: list[np.ndarray], count: int, generator: torch.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """`count` (image index, label within the group): a class uniformly, then one of its images uniformly."""
    labels = torch.randint(len(classes), (count,), generator=generator).numpy()
    picks = torch.rand(count, generator=generator, dtype=torch.float64).numpy()
    members = [images_per_class[c] for c in classes]
    sizes = np.array([len(m) for m in members], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    offsets = np.minimum((picks * sizes[labels]).astype(np.int64), sizes[labels] - 1)
    return np.concatenate(members)[starts[labels] + offsets], labels.astype(np.int64)


class CosPlaceMethod(Method):
    """CosPlace's part of a run: groups, one classifier per group, sampling and augmentation generators."""

    cfg: CosPlaceConfig

    def load(self) -> None:
        self.train_set = load_split_images(self.cfg.dataset, "train")
        self.train_set.require_labels("CosPlace training")

    def start(self, run: RunDir, model: VPRModel | None, state: dict | None, phase: Phase) -> None:
        cfg = self.cfg
        groups = rank0_first(lambda: build_groups(self.train_set, cfg.groups, cache=run.root / "groups.h5"))
        if groups.num_groups == 0:
            raise UsageError(
                f"{self.train_set.source}: no class has {cfg.groups.min_images_per_class} images ({len(self.train_set)} "
                "images); lower `min_images_per_class` or raise `cell_m`"
            )
        used = min(cfg.groups_num, groups.num_groups)
        if used < cfg.groups_num:
            log.warning("%s: only %d groups have classes; training on %d instead of %d",
                        self.train_set.source, groups.num_groups, used, cfg.groups_num)
        self.group_classes = [groups.classes_of_group(g) for g in range(used)]
        self.images_per_class = groups.images_per_class()
        self.model = model if model is not None else build_model(cfg.model_config(), pretrained=cfg.pretrained, seed=cfg.seed)
        self.classifiers = [CosFaceClassifier(cfg.dim, len(c)) for c in self.group_classes]
        self.sampler = torch.Generator().manual_seed(cfg.seed)
        self.augmenter = torch.Generator().manual_seed(cfg.seed + 1)
        self.model_opt = torch.optim.Adam(trainable(self.model, cfg), lr=cfg.lr)
        self.net = parallel(self.model, cfg)
        if state is None:
            for classifier, weights in zip(self.classifiers, distributed.broadcast_object([c.state_dict() for c in self.classifiers])):
                classifier.load_state_dict(weights)  # rank 0's on every rank
            self.classifier_opts = [torch.optim.Adam(c.parameters(), lr=cfg.classifier_lr) for c in self.classifiers]
            return
        if len(state["classifiers"]) != len(self.classifiers):
            raise UsageError(f"{cfg.out}: the run used {len(state['classifiers'])} groups, the dataset now gives "
                             f"{len(self.classifiers)}; start a new `out`")
        for classifier, saved in zip(self.classifiers, state["classifiers"]):
            classifier.load_state_dict(saved)
        self.classifier_opts = [torch.optim.Adam(c.parameters(), lr=cfg.classifier_lr) for c in self.classifiers]
        self.model_opt.load_state_dict(state["model_optimizer"])
        for opt, saved in zip(self.classifier_opts, state["classifier_optimizers"]):
            opt.load_state_dict(saved)
            move_optimizer_state(opt, torch.device("cpu"))
        self.sampler.set_state(state["sampler"])
        self.augmenter.set_state(state["augmenter"])

    def state(self) -> dict:
        return {
            "model_optimizer": self.model_opt.state_dict(), "classifiers": [c.state_dict() for c in self.classifiers],
            "classifier_optimizers": [o.state_dict() for o in self.classifier_opts],
            "sampler": self.sampler.get_state(), "augmenter": self.augmenter.get_state(),
        }

    def train_epoch(self, epoch: int, phase: Phase) -> dict:
        """Train on group epoch % groups for `iterations_per_epoch` steps."""
        cfg, group, device = self.cfg, epoch % len(self.classifiers), torch.device(self.cfg.device)
        classifier, opt = self.classifiers[group].to(device), self.classifier_opts[group]
        move_optimizer_state(opt, device)
        total = cfg.iterations_per_epoch * cfg.batch_size
        indices, labels = sample_epoch(self.group_classes[group], self.images_per_class, total, self.sampler)
        share = global_share(cfg.batch_size)  # this rank's rows of every step's batch
        mine = (np.arange(cfg.iterations_per_epoch)[:, None] * cfg.batch_size + np.arange(share.start, share.stop)).ravel()
        indices, labels, weight = indices[mine], labels[mine], len(mine) / total * distributed.world_size()
        loader = DataLoader(
            ImageFiles([self.train_set.paths[i] for i in indices], cfg.input_size), batch_size=share.stop - share.start,
            shuffle=False, num_workers=cfg.workers, pin_memory=device.type == "cuda",
        )
        progress = phase(f"group {group}")
        loss_sum, start = torch.zeros((), device=device), time.perf_counter()
        self.model.train()
        for step, (images, positions, errors, _) in enumerate(loader):
            first_error(errors)
            target = torch.from_numpy(labels[positions.numpy()]).to(device)
            batch = augment_batch(images.to(device, non_blocking=True).float() / 255.0, cfg.augment, self.augmenter,
                                  rows=(share.start, cfg.batch_size))
            batch = normalize_batch(batch * 255.0, self.model.config.mean, self.model.config.std)
            with self.precision.autocast():
                cosine = classifier(self.net(batch.contiguous(memory_format=torch.channels_last)))
            loss = cosface_loss(cosine, target, cfg.scale, cfg.margin) * weight  # DDP's mean over ranks: the global mean
            self.precision.step(loss, [self.model_opt, opt], shared=list(classifier.parameters()))
            loss_sum += loss.detach()
            if progress:
                progress(step + 1, cfg.iterations_per_epoch)
        seconds = time.perf_counter() - start
        distributed.all_reduce_mean(loss_sum)
        self.classifiers[group].cpu()
        move_optimizer_state(opt, torch.device("cpu"))
        return {"loss": float(loss_sum) / cfg.iterations_per_epoch, "group": group,
                "classes": len(self.group_classes[group]), "images": total, "train_seconds": round(seconds, 2)}

    def finish(self, run: RunDir, epochs_done: int, phase: Phase) -> dict:
        """Groups in the rotation, and how many of them this run has trained so far."""
        return {"groups": len(self.classifiers), "groups_trained": min(epochs_done, len(self.classifiers))}


def train_cosplace(config: CosPlaceConfig, *, resume: bool = False, progress: TrainProgress | None = None,
                   on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train (or `resume`) a CosPlace model on the dataset's train split, validating on `val_split`."""
    return train(config, CosPlaceMethod, resume=resume, progress=progress, on_epoch=on_epoch)
