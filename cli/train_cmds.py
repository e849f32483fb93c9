"""`vpr train`: train a model from random init (or a local ImageNet backbone) on an `@`-layout dataset.

Common options come first, then each method's own (their help starts with the method's name). Which method an
option belongs to, and which field of that method's config it sets, is declared once in `METHOD_OPTIONS`; an
option of another method is refused (exit 2) instead of being silently ignored. Every default is the config
dataclass's own. The command only builds the method's config from the options and prints; the library decides
everything else. Under torchrun (`torchrun --nproc-per-node G --no-python vpr train ...`) every rank joins the
process group and trains its share (DistributedDataParallel); only rank 0 prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import (
    INT32_MAX, MAX_BATCH, MAX_CLUSTERS, MAX_DIM, MAX_WORKERS, NON_NEGATIVE, POSITIVE, SEED_MAX, console, device_of,
    distributed_run, number_range, parse_size, phase_bar, print_json,
)
from cli.group_options import ALPHA, CELL_M, CELL_N, MIN_IMAGES, SECTOR_L
from vpr import api
from vpr.api import RECIPES, AugmentParams, CosPlaceConfig, GroupParams, NetVLADConfig, PlaceBatchConfig, TrainConfig
from vpr.errors import UsageError

CONFIGS = {"cosplace": CosPlaceConfig, "netvlad": NetVLADConfig, **{name: PlaceBatchConfig for name in RECIPES}}
PLACE_BATCH = tuple(RECIPES)
# option (the command's parameter) -> (its method or methods, the config field it sets: "groups.M" is a GroupParams
# field); a None value leaves the config's default
METHOD_OPTIONS = {
    "dim": ("cosplace", "dim"), "classifier_lr": ("cosplace", "classifier_lr"), "groups_num": ("cosplace", "groups_num"),
    "cell_m": ("cosplace", "groups.M"), "alpha": ("cosplace", "groups.alpha"), "cell_n": ("cosplace", "groups.N"),
    "sector_l": ("cosplace", "groups.L"), "min_images_per_class": ("cosplace", "groups.min_images_per_class"),
    "scale": ("cosplace", "scale"), "margin": ("cosplace", "margin"), "brightness": ("cosplace", "augment.brightness"),
    "contrast": ("cosplace", "augment.contrast"), "saturation": ("cosplace", "augment.saturation"),
    "hue": ("cosplace", "augment.hue"), "crop_scale": ("cosplace", "augment.crop_scale"),
    "clusters": ("netvlad", "num_clusters"), "triplet_margin": ("netvlad", "margin"),
    "negatives": ("netvlad", "num_negatives"), "neg_samples": ("netvlad", "neg_samples"),
    "cache_refresh": ("netvlad", "cache_refresh"), "mining_subset": ("netvlad", "mining_subset"),
    "pos_radius": ("netvlad", "pos_radius"), "neg_radius": ("netvlad", "neg_radius"),
    "optimizer": (("netvlad", *PLACE_BATCH), "optimizer"), "weight_decay": (("netvlad", *PLACE_BATCH), "weight_decay"),
    "lr_step": ("netvlad", "lr_step"),
    "lr_gamma": ("netvlad", "lr_gamma"), "init_images": ("netvlad", "init_images"),
    "init_per_image": ("netvlad", "init_per_image"), "clusters_cache": ("netvlad", "clusters_cache"),
    "pca_dim": ("netvlad", "pca_dim"),
    **{name: (PLACE_BATCH, name) for name in ("places_per_batch", "images_per_place", "train_blocks", "train_size", "warmup",
                                             "milestones", "gamma", "momentum", "augment", "init", "val", "reference",
                                             "steps")},
}
PLACE_BATCH_COMMON = ("backbone", "layer", "input_size", "epochs", "iterations_per_epoch")  # the recipe's unless given
RECORD_CORE = ("epoch", "loss", "R@1", "R@5", "best", "seconds", "images", "images_per_second", "train_seconds")
SIZE = f"{TrainConfig.input_size[0]}x{TrainConfig.input_size[1]}"


def _value(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def epoch_line(record: dict) -> str:
    """One line per epoch for every method: the shared figures, then the method's own."""
    own = ", ".join(f"{k.replace('_', ' ')} {_value(v)}" for k, v in record.items() if k not in RECORD_CORE)
    return (
        f"epoch {record['epoch']}: loss {record['loss']:.4f} R@1 {record['R@1']:.2f} R@5 {record['R@5']:.2f} "
        f"{record['images_per_second']:.1f} img/s{' (best)' if record['best'] else ''}" + (f"; {own}" if own else "")
    )


def summary_line(result) -> str:
    """The closing line for every method."""
    recall = " ".join(f"{k} {v:.2f}" for k, v in result.best_recall.items())
    own = "".join(f", {k.replace('_', ' ')} {_value(v)}" for k, v in result.extras.items() if isinstance(v, (int, float, str)))
    return f"best epoch {result.best_epoch} ({recall}) -> {result.best}{own}; resume with --resume --out {result.run_dir}"


def method_config(ctx: typer.Context, method: str, common: dict, values: dict) -> TrainConfig:
    """The method's config from the common settings and the options `METHOD_OPTIONS` gives it; an option of
    another method given on the command line is a usage error naming it."""
    def given(name: str) -> bool:
        source = ctx.get_parameter_source(name)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    def flag(name: str) -> str:
        return next(p.opts[0] for p in ctx.command.params if p.name == name)

    own: dict = {}
    for name, (owners, target) in METHOD_OPTIONS.items():
        owners = (owners,) if isinstance(owners, str) else owners
        if method not in owners:
            if given(name):
                kinds = " / ".join(sorted({"place-batch" if o in PLACE_BATCH else o for o in owners}))
                raise UsageError(f"{flag(name)} is a {kinds} option; --method {method} does not use it (drop it)")
            continue
        if values[name] is None:
            continue
        part, _, field = target.rpartition(".")
        (own.setdefault(part, {}) if part else own)[field] = values[name]
    if method == "cosplace":
        own["groups"], own["augment"] = GroupParams(**own.pop("groups")), AugmentParams(**own.pop("augment"))
    if method in PLACE_BATCH:
        if given("batch_size"):
            raise UsageError(f"--batch-size: --method {method} takes --places-per-batch x --images-per-place instead")
        common = {k: v for k, v in common.items() if k not in (*PLACE_BATCH_COMMON, "batch_size")
                  or given("resize" if k == "input_size" else k)}
        own["recipe"] = method
        own["train_size"] = parse_size(own["train_size"], "--train-size") if "train_size" in own else None
        own["milestones"] = tuple(int(m) for m in own["milestones"].split(",") if m.strip()) if "milestones" in own else None
    return CONFIGS[method](**common, **own)


def train_cmd(
    ctx: typer.Context,
    method: str = typer.Option(..., "--method", help=f"Training method: {', '.join(CONFIGS)} (cosplace: classification over class groups; netvlad: triplets; the others: place batches with multi-similarity loss, each with its reference recipe)."),
    dataset: Path = typer.Option(..., "--dataset", help="Dataset root: ROOT/images/SPLIT/{database,queries} (or ROOT/SPLIT/...) with `@utm_east@utm_north@...` names; cosplace reads every image under the train split; place-batch methods also take a GSV-Cities root or a places CSV (vpr places)."),
    out: Path = typer.Option(..., "--out", help="Run directory (runs/NAME): config.json, last.pt, best.pt, log.jsonl, caches."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last.pt (same options; --epochs may grow)."),
    epochs: int = typer.Option(TrainConfig.epochs, "--epochs", min=1, max=100_000, help="Number of epochs (CosPlace's paper: 50; pytorch-NetVlad: 30; place-batch default: the recipe's, each a pass over the places)."),
    iterations_per_epoch: int = typer.Option(TrainConfig.iterations_per_epoch, "--iterations-per-epoch", min=1, max=INT32_MAX, help="Optimiser steps per epoch (CosPlace's paper: 10000); netvlad: at most this many, fewer when a pass over the queries ends first."),
    batch_size: int = typer.Option(TrainConfig.batch_size, "--batch-size", min=1, max=MAX_BATCH, help="Images per optimiser step; netvlad: --batch-size // (2 + --negatives) tuples, at least one."),
    lr: Optional[float] = typer.Option(TrainConfig.lr, "--lr", callback=POSITIVE, help="Backbone + head learning rate. Default: cosplace 1e-5 (paper) with --pretrained, 3e-4 from random init; netvlad 1e-4."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(TrainConfig.seed, "--seed", min=0, max=SEED_MAX, help="Random seed (weights, sampling, augmentation)."),
    backbone: str = typer.Option(TrainConfig.backbone, "--backbone", help="resnet18, resnet50, resnet101 or vgg16; place-batch methods also dinov2_vits14 ... vitg14 (default: the recipe's)."),
    layer: int = typer.Option(TrainConfig.layer, "--layer", min=3, max=4, help="ResNet stage to cut after (4, or 3)."),
    resize: str = typer.Option(SIZE, "--resize", help="Input size HEIGHTxWIDTH images are resized to (place-batch: the evaluation size; default the recipe's)."),
    pretrained: Optional[str] = typer.Option(TrainConfig.pretrained, "--pretrained", help="ImageNet backbone weights: a local torchvision .pth file (or a torchvision weights name, needs internet)."),
    freeze_early: Optional[bool] = typer.Option(TrainConfig.freeze_early, "--freeze-early/--train-all-layers", help="Freeze ResNet conv1..layer2 / VGG conv1..conv4 as the reference code does. Default: freeze only with --pretrained."),
    val_split: str = typer.Option(TrainConfig.val_split, "--val-split", help="Split whose database/queries give recall@1/5 after each epoch."),
    workers: int = typer.Option(TrainConfig.workers, "--workers", min=0, max=MAX_WORKERS, help="DataLoader worker processes for decoding images."),
    amp: bool = typer.Option(TrainConfig.amp, "--amp/--no-amp", help="Mixed precision on CUDA: bf16 autocast, or fp16 with a grad scaler on GPUs without bf16 (ignored on CPU)."),
    json_out: bool = typer.Option(False, "--json", help="Print the per-epoch records and the summary as JSON."),
    dim: int = typer.Option(CosPlaceConfig.dim, "--dim", min=1, max=MAX_DIM, help="[cosplace] Descriptor size (NetVLAD's is --clusters x backbone channels)."),
    classifier_lr: float = typer.Option(CosPlaceConfig.classifier_lr, "--classifier-lr", callback=POSITIVE, help="[cosplace] Learning rate of the per-group CosFace classifiers."),
    groups_num: int = typer.Option(CosPlaceConfig.groups_num, "--groups-num", min=1, max=INT32_MAX, help="[cosplace] Groups to train on, largest first (one per epoch, cycling)."),
    cell_m: float = CELL_M, alpha: float = ALPHA, cell_n: int = CELL_N, sector_l: int = SECTOR_L,
    min_images_per_class: int = MIN_IMAGES,
    scale: float = typer.Option(CosPlaceConfig.scale, "--scale", callback=POSITIVE, help="[cosplace] CosFace scale s."),
    margin: float = typer.Option(CosPlaceConfig.margin, "--margin", callback=number_range(0, 1, high_open=True), help="[cosplace] CosFace margin m."),
    brightness: float = typer.Option(AugmentParams.brightness, "--brightness", callback=NON_NEGATIVE, help="[cosplace] Colour jitter brightness (0 disables)."),
    contrast: float = typer.Option(AugmentParams.contrast, "--contrast", callback=NON_NEGATIVE, help="[cosplace] Colour jitter contrast (0 disables)."),
    saturation: float = typer.Option(AugmentParams.saturation, "--saturation", callback=NON_NEGATIVE, help="[cosplace] Colour jitter saturation (0 disables)."),
    hue: float = typer.Option(AugmentParams.hue, "--hue", callback=number_range(0, 0.5), help="[cosplace] Colour jitter hue, at most 0.5 (0 disables)."),
    crop_scale: float = typer.Option(AugmentParams.crop_scale, "--crop-scale", callback=number_range(0, 1, low_open=True), help="[cosplace] Smallest area fraction of the random resized crop, as the reference's scale [0.5, 1] (1 disables)."),
    clusters: int = typer.Option(NetVLADConfig.num_clusters, "--clusters", min=2, max=MAX_CLUSTERS, help="[netvlad] NetVLAD clusters K; the descriptor has K x backbone-channels dims."),
    triplet_margin: float = typer.Option(NetVLADConfig.margin, "--triplet-margin", callback=POSITIVE, help="[netvlad] Triplet margin m on squared L2 distances (the paper's 0.1)."),
    negatives: int = typer.Option(NetVLADConfig.num_negatives, "--negatives", min=1, max=MAX_BATCH, help="[netvlad] Hard negatives per query; a step holds --batch-size // (2 + negatives) tuples."),
    neg_samples: int = typer.Option(NetVLADConfig.neg_samples, "--neg-samples", min=1, max=INT32_MAX, help="[netvlad] Random negatives drawn per query at each mining, besides its remembered hardest."),
    cache_refresh: int = typer.Option(NetVLADConfig.cache_refresh, "--cache-refresh", min=1, max=INT32_MAX, help="[netvlad] Queries mined per refresh of the feature cache."),
    mining_subset: Optional[int] = typer.Option(NetVLADConfig.mining_subset, "--mining-subset", min=1, max=INT32_MAX, help="[netvlad] Partial mining for large databases: cache this many random database images per refresh (default: all)."),
    pos_radius: float = typer.Option(NetVLADConfig.pos_radius, "--pos-radius", callback=POSITIVE, help="[netvlad] Potential positives: database images within this many metres of the query."),
    neg_radius: float = typer.Option(NetVLADConfig.neg_radius, "--neg-radius", callback=POSITIVE, help="[netvlad] Negatives: database images farther than this many metres."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="[netvlad] adam (default) or sgd (momentum 0.9, as in the paper); [place-batch] sgd or adamw (default: the recipe's)."),
    weight_decay: Optional[float] = typer.Option(NetVLADConfig.weight_decay, "--weight-decay", callback=NON_NEGATIVE, help="[netvlad] Weight decay. Default: 0.001 with sgd, none with adam (as pytorch-NetVlad); [place-batch] default: the recipe's."),
    lr_step: int = typer.Option(NetVLADConfig.lr_step, "--lr-step", min=1, max=INT32_MAX, help="[netvlad] Multiply the learning rate by --lr-gamma every this many epochs."),
    lr_gamma: float = typer.Option(NetVLADConfig.lr_gamma, "--lr-gamma", callback=POSITIVE, help="[netvlad] Learning-rate decay factor."),
    init_images: int = typer.Option(NetVLADConfig.init_images, "--init-images", min=1, max=INT32_MAX, help="[netvlad] Random database images whose local features are clustered to initialise NetVLAD."),
    init_per_image: int = typer.Option(NetVLADConfig.init_per_image, "--init-per-image", min=1, max=INT32_MAX, help="[netvlad] Local features sampled per image for the clustering; at most the feature map's positions (80 for ResNet18 at 240x320), with a warning."),
    clusters_cache: Optional[Path] = typer.Option(NetVLADConfig.clusters_cache, "--clusters-cache", help="[netvlad] HDF5 file of the k-means clusters, reused when it matches (default: OUT/clusters.h5)."),
    places_per_batch: Optional[int] = typer.Option(None, "--places-per-batch", min=2, max=MAX_BATCH, help="[place-batch] Places P per batch (default: the recipe's: convap and gem 100, mixvpr 120, salad 60, boq 128)."),
    images_per_place: Optional[int] = typer.Option(None, "--images-per-place", min=2, max=MAX_BATCH, help="[place-batch] Images K of each place per batch; places with fewer are left out (default 4)."),
    train_blocks: Optional[int] = typer.Option(None, "--train-blocks", min=0, max=1000, help="[place-batch] Trailing ResNet stages / ViT blocks trained, the rest frozen (default: the recipe's; the CNN recipes freeze only with --pretrained or --init, as gsv-cities does)."),
    train_size: Optional[str] = typer.Option(None, "--train-size", help="[place-batch] Training size HEIGHTxWIDTH (default: the recipe's; salad and boq train at 224x224 and evaluate at 322x322)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, max=INT32_MAX, help="[place-batch] A budget of optimiser steps instead of --epochs (the last epoch stops part-way)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", min=0, max=INT32_MAX, help="[place-batch] Linear warm-up steps (default: the recipe's, at most a tenth of the run's steps)."),
    milestones: Optional[str] = typer.Option(None, "--milestones", help="[place-batch] Steps at which the lr is multiplied by --gamma, e.g. 300,600 (default: none; --reference-schedule: the recipe's epochs)."),
    gamma: Optional[float] = typer.Option(None, "--gamma", callback=NON_NEGATIVE, help="[place-batch] Learning-rate factor at each milestone (default: the recipe's)."),
    momentum: Optional[float] = typer.Option(None, "--momentum", callback=NON_NEGATIVE, help="[place-batch] SGD momentum (default 0.9)."),
    augment: str = typer.Option(PlaceBatchConfig.augment, "--augment", help="[place-batch] randaugment (the references' RandAugment, 3 ops) or none."),
    init: Optional[Path] = typer.Option(None, "--init", help="[place-batch] Fine-tune this file: a published model vpr loads or a vpr checkpoint (its preprocessing kept)."),
    val: Optional[Path] = typer.Option(None, "--val", help="[place-batch] Validation folder with database/ and queries/ (default: the dataset's --val-split)."),
    reference: bool = typer.Option(False, "--reference-schedule", help="[place-batch] The recipe's published schedule (warm-up and epoch milestones sized for GSV-Cities) instead of one sized to this run."),
    pca_dim: int = typer.Option(NetVLADConfig.pca_dim, "--pca-dim", min=0, max=MAX_DIM, help="[netvlad] PCA-whitening dims stored in best.pt after training (0: none; capped below the number of training database images)."),
) -> None:
    """Train a place-recognition model; checkpoints work with `vpr build-index --checkpoint`."""
    if method not in CONFIGS:
        raise UsageError(f"--method {method}: choose one of {', '.join(CONFIGS)}")
    device = device_of(device)  # under torchrun, each rank's own GPU
    common = dict(
        dataset=str(dataset), out=str(out), backbone=backbone, layer=layer, input_size=parse_size(resize), pretrained=pretrained,
        freeze_early=freeze_early, epochs=epochs, iterations_per_epoch=iterations_per_epoch, batch_size=batch_size, lr=lr,
        val_split=val_split, amp=amp, seed=seed, device=device, workers=workers,
    )
    config = method_config(ctx, method, common, locals())
    with distributed_run(device) as main, phase_bar(enabled=main and not json_out) as progress:
        result = api.train(config, resume=resume, progress=progress,
                           on_epoch=None if json_out or not main else (lambda record: console.print(epoch_line(record))))
    if not main:
        return
    if json_out:
        print_json({
            "method": method, "run": str(result.run_dir), "last": str(result.last), "best": str(result.best),
            "best_epoch": result.best_epoch, "best_recall": result.best_recall, "epochs_run": len(result.records),
            "seconds": round(result.seconds, 1), **result.extras, "epochs": result.records,
        })
        return
    console.print(summary_line(result))
