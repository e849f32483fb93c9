"""Place-batch recipes: the reference trainers' settings for Conv-AP, MixVPR, SALAD, BoQ and GeM, and the config
of a place-batch run (`PlaceBatchConfig`), which starts from a recipe and overrides any of its values.

Every method since GSV-Cities trains the same way (batches of P places x K images, multi-similarity loss and
miner); the recipes differ in backbone, trained part, aggregator, sizes, optimiser and schedule. The
sources (file, lines, commit) are in `docs/training-places.md`. The reference schedules are sized for
GSV-Cities (62k places, hundreds of steps per epoch); unless `reference` is asked for, a run sizes its
warm-up to its own budget (a tenth of its steps at most) and drops the epoch milestones (see `Schedule`).
Like `config.py`, this module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from vpr.errors import UsageError
from vpr.training.config import TrainConfig, check_learning_rate

OPTIMIZERS = ("sgd", "adamw")
AUGMENTS = ("randaugment", "none")


@dataclass(frozen=True)
class Recipe:
    """One reference trainer's settings. `train_blocks`: trailing ResNet stages or ViT blocks trained (the
    rest frozen, run without gradients); `milestones` in epochs (x `gamma`), or a linear decay to `end_factor`
    over `decay_steps`; `warmup` in steps (`warmup_epochs` when the reference counts it in epochs)."""

    head: str
    backbone: str
    layer: int
    train_size: tuple[int, int]
    eval_size: tuple[int, int]
    places_per_batch: int
    images_per_place: int
    train_blocks: int | None
    optimizer: str
    lr: float
    weight_decay: float
    warmup: int
    epochs: int
    momentum: float = 0.9
    milestones: tuple[int, ...] = ()
    gamma: float = 0.3
    decay_steps: int = 0
    end_factor: float = 1.0
    warmup_epochs: int = 0
    head_options: dict = field(default_factory=dict)
    freeze_always: bool = False  # the reference freezes even a randomly initialised backbone (its DINOv2 wrapper)


RECIPES = {
    "convap": Recipe("convap", "resnet50", 4, (320, 320), (320, 320), 100, 4, 2, "adamw", 2e-4, 0.0, 600, 30,
                     milestones=(5, 10, 15, 25), gamma=0.3, head_options={"out_channels": 1024, "s1": 2, "s2": 2}),
    "mixvpr": Recipe("mixvpr", "resnet50", 3, (320, 320), (320, 320), 120, 4, 1, "sgd", 0.05, 1e-3, 650, 80,
                     milestones=(5, 10, 15, 25, 45), gamma=0.3),
    "gem": Recipe("gem", "resnet50", 4, (320, 320), (320, 320), 100, 4, 2, "adamw", 2e-4, 0.0, 600, 30,
                  milestones=(5, 10, 15, 25), gamma=0.3),
    "salad": Recipe("salad", "dinov2_vitb14", 4, (224, 224), (322, 322), 60, 4, 4, "adamw", 6e-5, 9.5e-9, 0, 4,
                    decay_steps=4000, end_factor=0.2, freeze_always=True),
    "boq": Recipe("boq", "dinov2_vitb14", 4, (224, 224), (322, 322), 128, 4, 2, "adamw", 1e-4, 1e-4, 0, 40,
                  milestones=(10, 20), gamma=0.1, warmup_epochs=10, head_options={"proj_channels": 512, "row_dim": 16},
                  freeze_always=True),
}


@dataclass(frozen=True)
class Schedule:
    """The learning-rate factor of every step: a linear warm-up over `warmup` steps, then x`gamma` at each of
    `milestones` (steps), or linear from 1 to `end_factor` over `decay_steps` steps (then flat)."""

    warmup: int
    milestones: tuple[int, ...] = ()
    gamma: float = 1.0
    decay_steps: int = 0
    end_factor: float = 1.0

    def factor(self, step: int) -> float:
        """The factor at optimiser step `step` (0-based), as the references compute it."""
        if self.decay_steps:
            decay = 1.0 + (self.end_factor - 1.0) * min(step, self.decay_steps) / self.decay_steps
        else:
            decay = self.gamma ** sum(step >= m for m in self.milestones)
        return decay * min(1.0, (step + 1) / self.warmup) if step < self.warmup else decay

    def describe(self) -> str:
        """One line for the log: what a run chose."""
        tail = (f"linear decay to x{self.end_factor:g} over {self.decay_steps} steps" if self.decay_steps else
                f"x{self.gamma:g} at steps {', '.join(map(str, self.milestones))}" if self.milestones else "then constant")
        return f"warm-up {self.warmup} steps, {tail}"


@dataclass(frozen=True)
class PlaceBatchConfig(TrainConfig):
    """A place-batch run: `recipe` (convap, mixvpr, gem, salad, boq) and overrides of its values (None: the
    recipe's). `dataset`: a GSV-Cities root, a places CSV (`vpr places`) or a standard-layout root (places made
    from its train split); `val`: a folder of database/ and queries/ (None: the dataset's `val_split`);
    `init`: a published or vpr file to fine-tune; `iterations_per_epoch` None: one pass over the places."""

    recipe: str = "convap"
    reference: bool = False  # the reference schedule as published (warm-up and epoch milestones for GSV-Cities)
    backbone: str | None = None
    layer: int | None = None
    input_size: tuple[int, int] | None = None  # the model's (evaluation) size
    train_size: tuple[int, int] | None = None
    places_per_batch: int | None = None
    images_per_place: int | None = None
    train_blocks: int | None = None  # None: the recipe's (CNN recipes: only with `pretrained` or `init`, as gsv-cities)
    optimizer: str | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    warmup: int | None = None
    milestones: tuple[int, ...] | None = None  # in steps
    gamma: float | None = None
    augment: str = "randaugment"
    epochs: int | None = None
    steps: int | None = None  # a budget of optimiser steps instead of `epochs` (the last epoch stops part-way)
    iterations_per_epoch: int | None = None
    init: str | None = None
    val: str | None = None
    head_options: dict | None = None

    @property
    def method(self) -> str:  # the recipe names the method in config.json and last.pt
        return self.recipe

    @property
    def plan(self) -> Recipe:
        """The recipe this run starts from."""
        if self.recipe not in RECIPES:
            raise UsageError(f"`recipe` {self.recipe}: choose one of {', '.join(RECIPES)}")
        return RECIPES[self.recipe]

    def default_lr(self) -> float:
        return self.plan.lr

    def resolved(self) -> "PlaceBatchConfig":
        plan = self.plan
        if self.steps is not None and self.epochs is not None:
            raise UsageError(f"`steps` {self.steps} and `epochs` {self.epochs}: give one budget, not both")
        own = {name: getattr(plan, name) if getattr(self, name) is None else getattr(self, name)
               for name in ("backbone", "layer", "places_per_batch", "images_per_place", "optimizer",
                            "weight_decay", "momentum", "gamma", "epochs", "head_options")}
        own["input_size"] = self.input_size or (self.train_size if self.train_size and plan.train_size == plan.eval_size
                                                else plan.eval_size)
        own["train_size"] = self.train_size or (self.input_size if self.input_size and plan.train_size == plan.eval_size
                                                else plan.train_size)
        started = self.pretrained is not None or self.init is not None or plan.freeze_always
        own["train_blocks"] = self.train_blocks if self.train_blocks is not None else (plan.train_blocks if started else None)
        own["val"] = str(Path(self.val).resolve()) if self.val else None
        own["init"] = str(Path(self.init).resolve()) if self.init else None
        own["batch_size"] = own["places_per_batch"] * own["images_per_place"]
        return replace(self, **own).checked()

    def checked(self) -> "PlaceBatchConfig":
        """TrainConfig's checks and defaults, then the place-batch settings'."""
        done = TrainConfig.resolved(self)
        if done.optimizer not in OPTIMIZERS:
            raise UsageError(f"`optimizer` {done.optimizer}: choose one of {', '.join(OPTIMIZERS)}")
        if done.augment not in AUGMENTS:
            raise UsageError(f"`augment` {done.augment}: choose one of {', '.join(AUGMENTS)}")
        if done.images_per_place < 2 or done.places_per_batch < 2:
            raise UsageError(f"`places_per_batch` {done.places_per_batch} x `images_per_place` {done.images_per_place}: "
                             "a batch needs at least 2 places of at least 2 images (positives and negatives)")
        if done.steps is not None and done.steps < 1:
            raise UsageError(f"`steps` {done.steps}: must be at least 1")
        if done.train_blocks is not None and done.train_blocks < 0:
            raise UsageError(f"`train_blocks` {done.train_blocks}: must be 0 (the aggregator alone) or more")
        if min(done.weight_decay, done.momentum, done.gamma) < 0 or (done.warmup is not None and done.warmup < 0):
            raise UsageError("`weight_decay`, `momentum`, `gamma` and `warmup` must be at least 0")
        check_learning_rate(done.lr, "lr")
        return done

    def schedule(self, steps_per_epoch: int) -> Schedule:
        """The run's schedule: the reference's (`reference`), else warm-up sized to the run's steps and no epoch
        milestones; explicit `warmup` and `milestones` always win."""
        plan, total = self.plan, self.steps or self.epochs * steps_per_epoch
        reference_warmup = plan.warmup or plan.warmup_epochs * steps_per_epoch
        if self.reference:
            warmup = reference_warmup
            milestones = tuple(m * steps_per_epoch for m in plan.milestones)
            decay = plan.decay_steps
        else:
            warmup = min(reference_warmup, total // 10) if reference_warmup else 0
            milestones, decay = (), total if plan.decay_steps else 0
        return Schedule(warmup=self.warmup if self.warmup is not None else warmup,
                        milestones=tuple(self.milestones) if self.milestones is not None else milestones,
                        gamma=self.gamma, decay_steps=decay, end_factor=plan.end_factor)

    def model_config(self):
        from vpr.models.model import ModelConfig

        return ModelConfig.for_backbone(self.backbone, head=self.plan.head, layer=self.layer,
                                        input_size=tuple(self.input_size), head_options=dict(self.head_options))
