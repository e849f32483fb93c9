"""The CosPlace trainer (Berton et al., CVPR 2022): classification over class groups with CosFace.

Each epoch trains on group `epoch % groups_num` for a fixed number of iterations; a batch samples a
class of the group uniformly, then one of its images. One CosFace classifier per group; only the
current one and its Adam state sit on the device. After each epoch: recall@1/5 on the validation
split, `last.pt` (everything `resume` needs), `best.pt` (by R@1) and a line in `log.jsonl`.

Defaults differ from the paper where the paper assumes an ImageNet-pretrained backbone: from random
init the backbone learns far too slowly at lr 1e-5 with its early layers frozen, so without
`pretrained` the backbone lr is `SCRATCH_LR` and every layer trains. Pass lr=1e-5 and
freeze_early=True (or a pretrained backbone) for the paper's setting.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from vpr.data.datasets import GeoImageSet, load_folder
from vpr.data.images import normalize_batch
from vpr.errors import ImageError, UsageError
from vpr.fileio import atomic_file
from vpr.models.checkpoints import save_checkpoint
from vpr.models.model import ModelConfig, VPRModel, build_model
from vpr.retrieval.extract import ImageFiles
from vpr.training.augment import AugmentParams, augment_batch
from vpr.training.cosface import CosFaceClassifier, cosface_loss
from vpr.training.cosplace_groups import ClassGroups, GroupParams, build_groups
from vpr.training.loop import (
    RunDir, load_training_checkpoint, rng_state, save_training_checkpoint, seed_everything, set_rng_state, validate,
)

log = logging.getLogger(__name__)

PAPER_LR = 1e-5
SCRATCH_LR = 3e-4
TrainProgress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True)
class CosPlaceConfig:
    """Everything that defines a CosPlace run; `resolved()` fills the pretrained-dependent defaults."""

    dataset: str
    out: str
    backbone: str = "resnet18"
    layer: int = 4
    dim: int = 512
    input_size: tuple[int, int] = (240, 320)
    pretrained: str | None = None
    epochs: int = 20
    iterations_per_epoch: int = 1000
    batch_size: int = 32
    lr: float | None = None  # backbone + head; None: 1e-5 when pretrained, SCRATCH_LR otherwise
    classifier_lr: float = 1e-2
    freeze_early: bool | None = None  # None: freeze when pretrained, as in the paper
    groups: GroupParams = field(default_factory=GroupParams)
    groups_num: int = 8
    scale: float = 30.0
    margin: float = 0.4
    augment: AugmentParams = field(default_factory=AugmentParams)
    amp: bool = True  # used on CUDA only
    val_split: str = "val"
    seed: int = 0
    device: str = "cpu"
    workers: int = 2

    def resolved(self) -> "CosPlaceConfig":
        """A copy with lr and freeze_early decided, validated, with an absolute dataset path."""
        for name in ("epochs", "iterations_per_epoch", "batch_size", "groups_num", "dim"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.workers < 0:
            raise UsageError(f"--workers {self.workers}: must be 0 or more")
        if not (self.scale > 0 and 0 <= self.margin < 1):
            raise UsageError(f"--scale {self.scale} --margin {self.margin}: need scale > 0 and 0 <= margin < 1")
        if not 0 < self.augment.crop_scale <= 1:
            raise UsageError(f"--crop-scale {self.augment.crop_scale}: the smallest crop area must be in (0, 1]")
        pretrained = self.pretrained is not None
        return replace(
            self, dataset=str(Path(self.dataset).resolve()), out=str(self.out),
            lr=self.lr if self.lr is not None else (PAPER_LR if pretrained else SCRATCH_LR),
            freeze_early=self.freeze_early if self.freeze_early is not None else pretrained,
        )

    def model_config(self) -> ModelConfig:
        return ModelConfig(backbone=self.backbone, head="cosplace", layer=self.layer, descriptor_dim=self.dim, input_size=self.input_size)

    def to_dict(self) -> dict:
        """JSON form for config.json (and the resume check)."""
        data = asdict(self)
        data["method"] = "cosplace"
        data["input_size"] = list(self.input_size)
        data["augment"]["crop_ratio"] = list(self.augment.crop_ratio)
        return data


@dataclass
class CosPlaceResult:
    """Where a finished run left its checkpoints, its best R@1 and the per-epoch records."""

    run_dir: Path
    last: Path
    best: Path
    best_r1: float
    records: list[dict]
    groups_used: int


def split_dir(root: Path, split: str) -> Path:
    """ROOT/images/SPLIT (VPR-datasets-downloader layout) or ROOT/SPLIT (CosPlace's processed layout)."""
    for candidate in (Path(root) / "images" / split, Path(root) / split):
        if candidate.is_dir():
            return candidate
    raise UsageError(f"{root}: no images/{split}/ (or {split}/) folder; expected ROOT/images/{{train,val,test}}/{{database,queries}}")


def load_validation(root: Path, split: str) -> tuple[GeoImageSet, GeoImageSet]:
    """(database, queries) of the validation split."""
    base = split_dir(root, split)
    if not ((base / "database").is_dir() and (base / "queries").is_dir()):
        raise UsageError(f"{base}: needs database/ and queries/ subfolders for validation; pass another --val-split")
    return load_folder(base / "database"), load_folder(base / "queries")


def freeze_early_layers(model: VPRModel) -> None:
    """Freeze the layers CosPlace freezes: ResNet conv1..layer2, VGG16 conv1..conv4."""
    frozen = 24 if model.config.backbone == "vgg16" else 6
    for module in list(model.backbone.children())[:frozen]:
        for param in module.parameters():
            param.requires_grad_(False)


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


def _cpu(value):
    """Tensors anywhere inside dicts/lists moved to the CPU (so checkpoints load without a GPU)."""
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


def _amp_setup(device: torch.device, enabled: bool) -> tuple[Callable[[], AbstractContextManager], torch.amp.GradScaler]:
    """Autocast context factory and grad scaler: bfloat16 where supported, else float16 with scaling."""
    if not (enabled and device.type == "cuda"):
        return nullcontext, torch.amp.GradScaler("cuda", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return (lambda: torch.autocast("cuda", dtype=dtype)), torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


class _Trainer:
    """The mutable state of one run: model, classifiers, optimisers, generators, counters."""

    def __init__(self, cfg: CosPlaceConfig, groups: ClassGroups, groups_used: int) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.group_classes = [groups.classes_of_group(g) for g in range(groups_used)]
        self.images_per_class = groups.images_per_class()
        seed_everything(cfg.seed)
        self.model = build_model(cfg.model_config(), pretrained=cfg.pretrained, seed=cfg.seed)
        self.classifiers = [CosFaceClassifier(cfg.dim, len(c)) for c in self.group_classes]
        self.sampler = torch.Generator().manual_seed(cfg.seed)
        self.augmenter = torch.Generator().manual_seed(cfg.seed + 1)
        self.start_epoch, self.best_r1 = 0, -1.0
        self.autocast, self.scaler = _amp_setup(self.device, cfg.amp)

    def build_optimizers(self) -> None:
        if self.cfg.freeze_early:
            freeze_early_layers(self.model)
        self.model.to(self.device).to(memory_format=torch.channels_last).train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.model_opt = torch.optim.Adam(params, lr=self.cfg.lr)
        self.classifier_opts = [torch.optim.Adam(c.parameters(), lr=self.cfg.classifier_lr) for c in self.classifiers]

    def state(self) -> dict:
        """Everything `restore` needs, weights-only loadable."""
        return _cpu({
            "epoch": self.start_epoch, "best_r1": self.best_r1,
            "model_optimizer": self.model_opt.state_dict(),
            "classifiers": [c.state_dict() for c in self.classifiers],
            "classifier_optimizers": [o.state_dict() for o in self.classifier_opts],
            "scaler": self.scaler.state_dict(), "sampler": self.sampler.get_state(),
            "augmenter": self.augmenter.get_state(), "rng": rng_state(),
        })

    def restore(self, model: VPRModel, state: dict) -> None:
        """Continue from a `state()` taken at the end of an epoch (instead of calling `build_optimizers`)."""
        if len(state["classifiers"]) != len(self.classifiers):
            raise UsageError(f"{self.cfg.out}: the run used {len(state['classifiers'])} groups, the dataset now gives {len(self.classifiers)}; start a new --out")
        self.model = model
        for classifier, saved in zip(self.classifiers, state["classifiers"]):
            classifier.load_state_dict(saved)
        self.build_optimizers()
        self.model_opt.load_state_dict(state["model_optimizer"])
        for opt, saved in zip(self.classifier_opts, state["classifier_optimizers"]):
            opt.load_state_dict(saved)
            move_optimizer_state(opt, torch.device("cpu"))
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.set_state(state["sampler"])
        self.augmenter.set_state(state["augmenter"])
        self.start_epoch, self.best_r1 = int(state["epoch"]), float(state["best_r1"])
        set_rng_state(state["rng"])

    def train_epoch(self, epoch: int, paths: list[Path], progress: TrainProgress | None) -> dict:
        """Train one epoch on group epoch % groups_num; return its loss and speed."""
        cfg, group = self.cfg, epoch % len(self.classifiers)
        classifier, opt = self.classifiers[group].to(self.device), self.classifier_opts[group]
        move_optimizer_state(opt, self.device)
        total = cfg.iterations_per_epoch * cfg.batch_size
        indices, labels = sample_epoch(self.group_classes[group], self.images_per_class, total, self.sampler)
        loader = DataLoader(
            ImageFiles([paths[i] for i in indices], cfg.input_size), batch_size=cfg.batch_size, shuffle=False,
            num_workers=cfg.workers, pin_memory=self.device.type == "cuda",
        )
        phase = f"epoch {epoch + 1}/{cfg.epochs} group {group}"
        loss_sum, start = torch.zeros((), device=self.device), time.perf_counter()
        self.model.train()
        for step, (images, positions, errors) in enumerate(loader):
            bad = next((e for e in errors if e), None)
            if bad:
                raise ImageError(bad)
            target = torch.from_numpy(labels[positions.numpy()]).to(self.device)
            batch = augment_batch(images.to(self.device, non_blocking=True).float() / 255.0, cfg.augment, self.augmenter)
            batch = normalize_batch(batch * 255.0, self.model.config.mean, self.model.config.std)
            with self.autocast():
                cosine = classifier(self.model(batch.contiguous(memory_format=torch.channels_last)))
            loss = cosface_loss(cosine, target, cfg.scale, cfg.margin)
            self.model_opt.zero_grad(set_to_none=True)
            opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.model_opt)
            self.scaler.step(opt)
            self.scaler.update()
            loss_sum += loss.detach()
            if progress:
                progress(phase, step + 1, cfg.iterations_per_epoch)
        seconds = time.perf_counter() - start
        self.classifiers[group].cpu()
        move_optimizer_state(opt, torch.device("cpu"))
        return {
            "epoch": epoch + 1, "group": group, "classes": len(self.group_classes[group]),
            "loss": float(loss_sum) / cfg.iterations_per_epoch, "train_seconds": round(seconds, 2),
            "images_per_second": round(total / seconds, 2),
        }


def _trim_log(run: RunDir, epochs_done: int) -> None:
    """Keep only log lines of epochs already in last.pt (a kill may have left a later one)."""
    if not run.log.is_file():
        return
    kept = []
    for line in run.log.read_text().splitlines():
        try:
            if json.loads(line).get("epoch", 0) <= epochs_done:
                kept.append(line)
        except ValueError:  # a line cut short by the kill
            continue
    with atomic_file(run.log) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


def train_cosplace(
    config: CosPlaceConfig, *, resume: bool = False, progress: TrainProgress | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> CosPlaceResult:
    """Train (or `resume`) a CosPlace model on DATASET/images/train, validating on the val split."""
    cfg = config.resolved()
    run = RunDir(Path(cfg.out))
    with run.locked():  # one process per run folder
        run.check(cfg.to_dict(), resume, inputs=[Path(cfg.dataset)])
        train_dir = split_dir(Path(cfg.dataset), "train")
        val_db, val_q = load_validation(Path(cfg.dataset), cfg.val_split)
        run.prepare(cfg.to_dict(), resume, inputs=[Path(cfg.dataset)])
        train_set = load_folder(train_dir)
        groups = build_groups(train_set, cfg.groups, cache=run.root / "groups.h5")
        if groups.num_groups == 0:
            raise UsageError(
                f"{train_dir}: no class has {cfg.groups.min_images_per_class} images ({len(train_set)} images); "
                "lower --min-images-per-class or raise --M"
            )
        groups_used = min(cfg.groups_num, groups.num_groups)
        if groups_used < cfg.groups_num:
            log.warning("%s: only %d groups have classes; training on %d instead of %d", train_dir, groups.num_groups, groups_used, cfg.groups_num)
        trainer = _Trainer(cfg, groups, groups_used)
        if resume:
            model, _, state = load_training_checkpoint(run.last)
            trainer.restore(model, state)
            _trim_log(run, trainer.start_epoch)
        else:
            trainer.build_optimizers()
        records: list[dict] = []
        for epoch in range(trainer.start_epoch, cfg.epochs):
            record = trainer.train_epoch(epoch, train_set.paths, progress)
            phase = f"epoch {epoch + 1}/{cfg.epochs} validating"
            recalls = validate(
                trainer.model, val_db, val_q, ns=(1, 5), batch_size=cfg.batch_size, num_workers=cfg.workers,
                device=cfg.device, amp=cfg.amp and trainer.device.type == "cuda",
                progress=(lambda done, total: progress(phase, done, total)) if progress else None,
            )
            trainer.model.train()
            record.update({"R@1": recalls[1], "R@5": recalls[5]})
            trainer.start_epoch = epoch + 1
            if recalls[1] > trainer.best_r1:
                trainer.best_r1 = recalls[1]
                save_checkpoint(trainer.model, run.best, extra={"epoch": epoch + 1, "recalls": {"R@1": recalls[1], "R@5": recalls[5]}})
            save_training_checkpoint(run.last, trainer.model, trainer.state())
            run.append_log(record)
            records.append(record)
            if on_epoch:
                on_epoch(record)
        return CosPlaceResult(run_dir=run.root, last=run.last, best=run.best, best_r1=trainer.best_r1, records=records, groups_used=groups_used)
