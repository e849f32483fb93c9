"""`vpr train`: train a model from random init (or a local ImageNet backbone) on an `@`-layout dataset.

Common options come first, then each method's own, tagged `[cosplace]` or `[netvlad]` in their help;
an option of the other method is refused (exit 2) instead of being silently ignored. The command only
builds the method's config from the options and prints; the library decides everything else.
Under torchrun (`torchrun --nproc-per-node G --no-python vpr train ...`) every rank joins the process
group and trains its share (DistributedDataParallel); only rank 0 prints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from cli.common import (
    DEGREES, INT32_MAX, MAX_BATCH, MAX_CLUSTERS, MAX_DIM, MAX_SPACING, MAX_WORKERS, NON_NEGATIVE, POSITIVE, SEED_MAX,
    console, distributed_run, number_range, parse_size, print_json, resolve_device, rich_progress,
)
from vpr import distributed
from vpr.errors import UsageError
from vpr.training.config import AugmentParams
from vpr.training.cosplace import train_cosplace
from vpr.training.config import CosPlaceConfig
from vpr.training.config import GroupParams
from vpr.training.loop import TrainResult
from vpr.training.netvlad import train_netvlad
from vpr.training.config import NetVLADConfig

METHODS = ("cosplace", "netvlad")
RECORD_CORE = ("epoch", "loss", "R@1", "R@5", "best", "seconds", "images", "images_per_second", "train_seconds")


@contextmanager
def training_bar(enabled: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A rich bar on stderr driven by the trainer's (phase, done, total) callback; it restarts per phase."""
    if not enabled:
        yield lambda phase, done, total: None
        return
    with rich_progress() as bar:
        task = bar.add_task("starting", total=None)
        current = {"phase": None}

        def update(phase: str, done: int, total: int) -> None:
            if phase != current["phase"]:
                current["phase"] = phase
                bar.reset(task, total=total, description=phase)
            bar.update(task, completed=done, total=total)

        yield update


def _value(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def epoch_line(record: dict) -> str:
    """One line per epoch for every method: the shared figures, then the method's own."""
    own = ", ".join(f"{k.replace('_', ' ')} {_value(v)}" for k, v in record.items() if k not in RECORD_CORE)
    return (
        f"epoch {record['epoch']}: loss {record['loss']:.4f} R@1 {record['R@1']:.2f} R@5 {record['R@5']:.2f} "
        f"{record['images_per_second']:.1f} img/s{' (best)' if record['best'] else ''}" + (f"; {own}" if own else "")
    )


def summary_line(result: TrainResult) -> str:
    """The closing line for every method."""
    recall = " ".join(f"{k} {v:.2f}" for k, v in result.best_recall.items())
    own = "".join(f", {k.replace('_', ' ')} {_value(v)}" for k, v in result.extras.items() if isinstance(v, (int, float, str)))
    return f"best epoch {result.best_epoch} ({recall}) -> {result.best}{own}; resume with --resume --out {result.run_dir}"


def refuse_other_methods_options(ctx: typer.Context, method: str) -> None:
    """A usage error for any option given on the command line that belongs to another method."""
    for param in ctx.command.params:
        tag = (getattr(param, "help", None) or "").partition("]")[0].lstrip("[")
        source = ctx.get_parameter_source(param.name)
        if tag in METHODS and tag != method and source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            raise UsageError(f"{param.opts[0]} is a {tag} option; --method {method} does not use it (drop it)")


def train_cmd(
    ctx: typer.Context,
    method: str = typer.Option(..., "--method", help="Training method: cosplace (classification over class groups) or netvlad (triplets)."),
    dataset: Path = typer.Option(..., "--dataset", help="Dataset root: ROOT/images/SPLIT/{database,queries} (or ROOT/SPLIT/...) with `@utm_east@utm_north@...` names; cosplace reads every image under the train split."),
    out: Path = typer.Option(..., "--out", help="Run directory (runs/NAME): config.json, last.pt, best.pt, log.jsonl, caches."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last.pt (same options; --epochs may grow)."),
    epochs: int = typer.Option(20, "--epochs", min=1, max=100_000, help="Number of epochs (CosPlace's paper: 50; pytorch-NetVlad: 30)."),
    iterations_per_epoch: int = typer.Option(1000, "--iterations-per-epoch", min=1, max=INT32_MAX, help="Optimiser steps per epoch (CosPlace's paper: 10000); netvlad: at most this many, fewer when a pass over the queries ends first."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, max=MAX_BATCH, help="Images per optimiser step; netvlad: --batch-size // (2 + --negatives) tuples, at least one."),
    lr: Optional[float] = typer.Option(None, "--lr", callback=POSITIVE, help="Backbone + head learning rate. Default: cosplace 1e-5 (paper) with --pretrained, 3e-4 from random init; netvlad 1e-4."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Random seed (weights, sampling, augmentation)."),
    backbone: str = typer.Option("resnet18", "--backbone", help="resnet18, resnet50, resnet101 or vgg16."),
    layer: int = typer.Option(4, "--layer", min=3, max=4, help="ResNet stage to cut after (4, or 3)."),
    dim: int = typer.Option(512, "--dim", min=1, max=MAX_DIM, help="[cosplace] Descriptor size (NetVLAD's is --clusters x backbone channels)."),
    resize: str = typer.Option("240x320", "--resize", help="Input size HEIGHTxWIDTH images are resized to."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="ImageNet backbone weights: a local torchvision .pth file (or a torchvision weights name, needs internet)."),
    freeze_early: Optional[bool] = typer.Option(None, "--freeze-early/--train-all-layers", help="Freeze ResNet conv1..layer2 / VGG conv1..conv4 as the reference code does. Default: freeze only with --pretrained."),
    val_split: str = typer.Option("val", "--val-split", help="Split whose database/queries give recall@1/5 after each epoch."),
    workers: int = typer.Option(2, "--workers", min=0, max=MAX_WORKERS, help="DataLoader worker processes for decoding images."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="Mixed precision on CUDA: bf16 autocast, or fp16 with a grad scaler on GPUs without bf16 (ignored on CPU)."),
    json_out: bool = typer.Option(False, "--json", help="Print the per-epoch records and the summary as JSON."),
    classifier_lr: float = typer.Option(1e-2, "--classifier-lr", callback=POSITIVE, help="[cosplace] Learning rate of the per-group CosFace classifiers."),
    groups_num: int = typer.Option(8, "--groups-num", min=1, max=INT32_MAX, help="[cosplace] Groups to train on, largest first (one per epoch, cycling)."),
    cell_m: float = typer.Option(10.0, "--M", callback=POSITIVE, help="[cosplace] Class cell side in metres."),
    alpha: float = typer.Option(30.0, "--alpha", callback=DEGREES, help="[cosplace] Class heading sector in degrees."),
    cell_n: int = typer.Option(5, "--N", min=1, max=MAX_SPACING, help="[cosplace] Group spacing in cells: same-group classes are >= M*(N-1) m apart."),
    sector_l: int = typer.Option(2, "--L", min=1, max=360, help="[cosplace] Group spacing in heading sectors (1 ignores heading for grouping)."),
    min_images_per_class: int = typer.Option(10, "--min-images-per-class", min=1, max=INT32_MAX, help="[cosplace] Drop classes with fewer images."),
    scale: float = typer.Option(30.0, "--scale", callback=POSITIVE, help="[cosplace] CosFace scale s."),
    margin: float = typer.Option(0.4, "--margin", callback=number_range(0, 1, high_open=True), help="[cosplace] CosFace margin m."),
    brightness: float = typer.Option(0.7, "--brightness", callback=NON_NEGATIVE, help="[cosplace] Colour jitter brightness (0 disables)."),
    contrast: float = typer.Option(0.7, "--contrast", callback=NON_NEGATIVE, help="[cosplace] Colour jitter contrast (0 disables)."),
    saturation: float = typer.Option(0.7, "--saturation", callback=NON_NEGATIVE, help="[cosplace] Colour jitter saturation (0 disables)."),
    hue: float = typer.Option(0.5, "--hue", callback=number_range(0, 0.5), help="[cosplace] Colour jitter hue, at most 0.5 (0 disables)."),
    crop_scale: float = typer.Option(0.5, "--crop-scale", callback=number_range(0, 1, low_open=True), help="[cosplace] Smallest area fraction of the random resized crop, as the reference's scale [0.5, 1] (1 disables)."),
    clusters: int = typer.Option(64, "--clusters", min=2, max=MAX_CLUSTERS, help="[netvlad] NetVLAD clusters K; the descriptor has K x backbone-channels dims."),
    triplet_margin: float = typer.Option(0.1, "--triplet-margin", callback=POSITIVE, help="[netvlad] Triplet margin m on squared L2 distances (the paper's 0.1)."),
    negatives: int = typer.Option(10, "--negatives", min=1, max=MAX_BATCH, help="[netvlad] Hard negatives per query; a step holds --batch-size // (2 + negatives) tuples."),
    neg_samples: int = typer.Option(1000, "--neg-samples", min=1, max=INT32_MAX, help="[netvlad] Random negatives drawn per query at each mining, besides its remembered hardest."),
    cache_refresh: int = typer.Option(1000, "--cache-refresh", min=1, max=INT32_MAX, help="[netvlad] Queries mined per refresh of the feature cache."),
    mining_subset: Optional[int] = typer.Option(None, "--mining-subset", min=1, max=INT32_MAX, help="[netvlad] Partial mining for large databases: cache this many random database images per refresh (default: all)."),
    pos_radius: float = typer.Option(10.0, "--pos-radius", callback=POSITIVE, help="[netvlad] Potential positives: database images within this many metres of the query."),
    neg_radius: float = typer.Option(25.0, "--neg-radius", callback=POSITIVE, help="[netvlad] Negatives: database images farther than this many metres."),
    optimizer: str = typer.Option("adam", "--optimizer", help="[netvlad] adam or sgd (momentum 0.9, as in the paper)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", callback=NON_NEGATIVE, help="[netvlad] Weight decay. Default: 0.001 with sgd, none with adam (as pytorch-NetVlad)."),
    lr_step: int = typer.Option(5, "--lr-step", min=1, max=INT32_MAX, help="[netvlad] Multiply the learning rate by --lr-gamma every this many epochs."),
    lr_gamma: float = typer.Option(0.5, "--lr-gamma", callback=POSITIVE, help="[netvlad] Learning-rate decay factor."),
    init_images: int = typer.Option(500, "--init-images", min=1, max=INT32_MAX, help="[netvlad] Random database images whose local features are clustered to initialise NetVLAD."),
    init_per_image: int = typer.Option(100, "--init-per-image", min=1, max=INT32_MAX, help="[netvlad] Local features sampled per image for the clustering; at most the feature map's positions (80 for ResNet18 at 240x320), with a warning."),
    clusters_cache: Optional[Path] = typer.Option(None, "--clusters-cache", help="[netvlad] HDF5 file of the k-means clusters, reused when it matches (default: OUT/clusters.h5)."),
    pca_dim: int = typer.Option(4096, "--pca-dim", min=0, max=MAX_DIM, help="[netvlad] PCA-whitening dims stored in best.pt after training (0: none; capped below the number of training database images)."),
) -> None:
    """Train a place-recognition model; checkpoints work with `vpr build-index --checkpoint`."""
    if method not in METHODS:
        raise UsageError(f"--method {method}: choose one of {', '.join(METHODS)}")
    refuse_other_methods_options(ctx, method)
    device = resolve_device(device)  # under torchrun, each rank's own GPU
    common = dict(
        dataset=str(dataset), out=str(out), backbone=backbone, layer=layer, input_size=parse_size(resize), pretrained=pretrained,
        freeze_early=freeze_early, epochs=epochs, iterations_per_epoch=iterations_per_epoch, batch_size=batch_size, lr=lr,
        val_split=val_split, amp=amp, seed=seed, device=device, workers=workers,
    )
    if method == "netvlad":
        config: CosPlaceConfig | NetVLADConfig = NetVLADConfig(
            **common, num_clusters=clusters, cache_refresh=cache_refresh, pos_radius=pos_radius, neg_radius=neg_radius,
            margin=triplet_margin, num_negatives=negatives, neg_samples=neg_samples, mining_subset=mining_subset,
            optimizer=optimizer, weight_decay=weight_decay, lr_step=lr_step, lr_gamma=lr_gamma, init_images=init_images,
            init_per_image=init_per_image, clusters_cache=clusters_cache, pca_dim=pca_dim,
        )
    else:
        config = CosPlaceConfig(
            **common, dim=dim, classifier_lr=classifier_lr, groups_num=groups_num, scale=scale, margin=margin,
            groups=GroupParams(M=cell_m, alpha=alpha, N=cell_n, L=sector_l, min_images_per_class=min_images_per_class),
            augment=AugmentParams(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, crop_scale=crop_scale),
        )
    trainer = train_netvlad if method == "netvlad" else train_cosplace
    main = distributed.is_main()
    with distributed_run(device), training_bar(enabled=main and not json_out) as progress:
        result = trainer(config, resume=resume, progress=progress,
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
