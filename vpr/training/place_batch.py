"""Place-batch training (GSV-Cities, Ali-bey et al. 2022; MixVPR, SALAD, BoQ): batches of P places x K images,
pytorch-metric-learning's multi-similarity miner and loss on the L2-normalised descriptors.

For descriptors x_i (unit length) with similarities S_ij = x_i . x_j, the miner (epsilon 0.1) keeps a positive
pair (i, j) when S_ij - epsilon < max_{k neg} S_ik and a negative pair (i, k) when S_ik + epsilon > min_{j pos} S_ij;
the loss over the anchors i with mined pairs P_i, N_i (alpha 1, beta 50, base lambda 0) is

    L = mean_i [ 1/alpha log(1 + sum_{j in P_i} exp(-alpha (S_ij - lambda)))
                 + 1/beta log(1 + sum_{k in N_i} exp(beta (S_ik - lambda))) ].

The trained part is `train_blocks` trailing ResNet stages or ViT blocks plus the aggregator; the frozen part has
no gradients (autograd records nothing before the first trained layer). Each epoch visits every place once
(`epoch_batches`); the learning rate follows the run's `Schedule` step by step. The rest of the run
(validation, checkpoints, resume, log) is `vpr.training.loop.train`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from vpr import distributed
from vpr.data.images import normalize_batch
from vpr.data.loading import ImageFiles
from vpr.errors import UsageError
from vpr.models.model import VPRModel, build_model
from vpr.training.loop import Method, Phase, TrainProgress, TrainResult, first_error, global_share, parallel, train
from vpr.training.place_data import epoch_batches, load_places
from vpr.training.recipes import PlaceBatchConfig, Schedule
from vpr.training.run import RunDir

EPSILON, ALPHA, BETA, BASE = 0.1, 1.0, 50.0, 0.0  # the references' miner margin and loss parameters


def multi_similarity():
    """pytorch-metric-learning's loss and miner as the reference trainers build them."""
    try:
        from pytorch_metric_learning import distances, losses, miners
    except ImportError:
        raise UsageError("place-batch training needs pytorch-metric-learning: pip install -e .") from None
    loss = losses.MultiSimilarityLoss(alpha=ALPHA, beta=BETA, base=BASE, distance=distances.DotProductSimilarity())
    return loss, miners.MultiSimilarityMiner(epsilon=EPSILON, distance=distances.CosineSimilarity())


def blocks_of(backbone: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(stem, blocks) of a trunk: a ViT's patch embedding and tokens, then its blocks; a ResNet's conv1..maxpool,
    then its stages."""
    if hasattr(backbone, "blocks"):
        return [backbone.patch_embed], list(backbone.blocks)
    children = list(backbone.children())
    first = next((i for i, c in enumerate(children) if isinstance(c, nn.Sequential)), len(children))
    return children[:first], children[first:]


def freeze_blocks(model: VPRModel, train_blocks: int | None) -> int:
    """Freeze all but the last `train_blocks` blocks of the trunk (None: nothing frozen); the frozen count."""
    if train_blocks is None:
        return 0
    stem, blocks = blocks_of(model.backbone)
    if train_blocks > len(blocks):
        raise UsageError(f"`train_blocks` {train_blocks}: {model.config.backbone} has {len(blocks)} blocks")
    frozen = stem + blocks[:len(blocks) - train_blocks]
    for module in frozen:
        module.requires_grad_(False)
    for name in ("cls_token", "pos_embed", "mask_token"):  # a ViT's token parameters belong to its stem
        param = getattr(model.backbone, name, None)
        if isinstance(param, nn.Parameter):
            param.requires_grad_(False)
    return len(frozen)


def augmenter(kind: str):
    """The references' train-time augmentation on resized uint8 images: RandAugment(3 ops), or none."""
    if kind == "none":
        return None
    from torchvision.transforms import InterpolationMode, v2

    return v2.RandAugment(num_ops=3, interpolation=InterpolationMode.BILINEAR)


def optimiser(params: list[nn.Parameter], cfg: PlaceBatchConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW, as the recipe (or the override) says."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def start_model(cfg: PlaceBatchConfig) -> VPRModel:
    """A new model of the recipe, or the `init` file's (its preprocessing and layout kept)."""
    if cfg.init is None:
        return build_model(cfg.model_config(), pretrained=cfg.pretrained, seed=cfg.seed)
    from vpr.models.checkpoints import load_checkpoint

    model, _ = load_checkpoint(cfg.init)
    if model.config.head != cfg.plan.head:
        raise UsageError(f"`init` {cfg.init}: a {model.config.head} model; fine-tune it with the {model.config.head} "
                         f"recipe, not {cfg.recipe}")
    return model


class PlaceBatchMethod(Method):
    """A place-batch run's state: places, sampler generator, optimiser and the step count of the schedule."""

    cfg: PlaceBatchConfig

    def load(self) -> None:
        self.places = load_places(self.cfg.dataset, self.cfg.images_per_place)
        count = len(self.places.places)
        if count < 2:
            raise UsageError(f"{self.places.source}: {count} place; place-batch training needs at least 2")
        self.steps_per_epoch = -(-count // self.cfg.places_per_batch)
        if self.cfg.iterations_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, self.cfg.iterations_per_epoch)
        if self.cfg.steps is not None:
            self.epochs = -(-self.cfg.steps // self.steps_per_epoch)
        self.schedule: Schedule = self.cfg.schedule(self.steps_per_epoch)

    def start(self, run: RunDir, model: VPRModel | None, state: dict | None, phase: Phase) -> None:
        cfg = self.cfg
        self.model = model if model is not None else start_model(cfg)
        self.frozen = freeze_blocks(self.model, cfg.train_blocks)
        self.model.to(torch.device(cfg.device)).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.net = parallel(self.model, cfg)
        self.optimizer = optimiser(self.params, cfg)
        self.loss_fn, self.miner = multi_similarity()
        self.augment = augmenter(cfg.augment)
        self.sampler = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.sampler.set_state(state["sampler"])
            self.step = int(state["step"])

    def state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "sampler": self.sampler.get_state(), "step": self.step}

    def augmented(self, images: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """RandAugment of each image, drawn from (seed, step, row in the step's batch): the same on any number of
        ranks and after a resume."""
        if self.augment is None:
            return images
        out = []
        for image, row in zip(images, rows.tolist()):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.cfg.seed * 1_000_003 + self.step) * 65_537 + row)
                out.append(self.augment(image))
        return torch.stack(out)

    def batch_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The multi-similarity loss of the step's whole batch (every rank's descriptors gathered before the
        miner, this rank's keeping their gradient), and the share of its pairs the miner kept."""
        batch = normalize_batch(images, self.model.config.mean, self.model.config.std)
        with self.precision.autocast():
            local = self.net(batch).float()
        blocks = distributed.all_gather_blocks(local)
        blocks[distributed.rank()] = local
        descriptors = torch.cat(blocks)
        pairs = self.miner(descriptors, labels)
        loss = self.loss_fn(descriptors, labels, pairs)
        n = len(labels)
        return loss, (len(pairs[0]) + len(pairs[2])) / max(n * (n - 1), 1)

    def train_epoch(self, epoch: int, phase: Phase) -> dict:
        """One pass over the places (at most `iterations_per_epoch` batches); each rank describes its share of
        every batch."""
        cfg, device = self.cfg, torch.device(self.cfg.device)
        batches = epoch_batches(self.places, cfg.places_per_batch, cfg.images_per_place, self.sampler)
        batches = batches[:self.steps_per_epoch]
        if self.cfg.steps is not None:  # the budget's last epoch stops part-way
            batches = batches[:max(self.cfg.steps - epoch * self.steps_per_epoch, 0)]
        order = np.concatenate(batches)
        bounds = np.cumsum([0] + [len(b) for b in batches])
        shares = [global_share(len(b)) for b in batches]
        steps = [list(range(lo + share.start, lo + share.stop)) for lo, share in zip(bounds[:-1], shares)]
        loader = DataLoader(ImageFiles([self.places.paths[i] for i in order], tuple(cfg.train_size)),
                            batch_sampler=steps, num_workers=cfg.workers, pin_memory=device.type == "cuda")
        progress = phase("places")
        losses, mined, start = [], [], time.perf_counter()
        self.model.train()
        for step, (images, positions, errors, _) in enumerate(loader):
            first_error(list(errors))
            lo, hi = bounds[step], bounds[step + 1]
            labels = torch.from_numpy(self.places.labels[order[lo:hi]]).to(device)
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr * self.schedule.factor(self.step)
            images = self.augmented(images, positions.numpy() - lo)
            loss, share = self.batch_loss(images.to(device), labels)
            self.precision.step(loss * distributed.world_size(), [self.optimizer])  # DDP averages: the full gradient
            self.step += 1
            losses.append(float(loss.detach()))
            mined.append(share)
            if progress:
                progress(step + 1, len(batches))
        return {"loss": float(np.mean(losses)), "images": int(len(order)), "train_seconds": round(time.perf_counter() - start, 2),
                "steps": len(batches), "mined_share": round(float(np.mean(mined)), 4),
                "lr": round(cfg.lr * self.schedule.factor(max(self.step - 1, 0)), 8)}

    def finish(self, run: RunDir, epochs_done: int, phase: Phase) -> dict:
        """What the run trained on and the schedule it chose."""
        return {"places": len(self.places.places), "train_images": len(self.places.paths),
                "left_out": sum(self.places.left_out.values()), "steps_per_epoch": self.steps_per_epoch,
                "frozen_blocks": self.frozen, "schedule": self.schedule.describe()}


def train_place_batch(config: PlaceBatchConfig, *, resume: bool = False, progress: TrainProgress | None = None,
                      on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train (or `resume`) a place-batch recipe on the dataset's places, validating after each epoch."""
    return train(config, PlaceBatchMethod, resume=resume, progress=progress, on_epoch=on_epoch)
