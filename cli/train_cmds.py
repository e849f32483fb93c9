"""`vpr train`: train a model from random init (or a local ImageNet backbone) on an `@`-layout dataset.

Common options come first; method-specific ones are grouped by method and ignored by the other.
Each method has a `_train_<method>` function that builds its config and calls the library.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from cli.common import (
    DEGREES, INT32_MAX, MAX_BATCH, MAX_CLUSTERS, MAX_DIM, MAX_SPACING, MAX_WORKERS, NON_NEGATIVE, POSITIVE, SEED_MAX,
    console, number_range, parse_size, print_json, resolve_device, rich_progress,
)
from vpr.errors import UsageError
from vpr.training.augment import AugmentParams
from vpr.training.cosplace import CosPlaceConfig, train_cosplace
from vpr.training.cosplace_groups import GroupParams
from vpr.training.netvlad import DEFAULT_LR, NetVLADTrainConfig, train_netvlad

METHODS = ("cosplace", "netvlad")


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


def _epoch_line(record: dict) -> str:
    return (
        f"epoch {record['epoch']}: group {record['group']} ({record['classes']} classes) loss {record['loss']:.4f} "
        f"R@1 {record['R@1']:.2f} R@5 {record['R@5']:.2f} {record['images_per_second']:.1f} img/s"
    )


def train_cmd(
    method: str = typer.Option(..., "--method", help="Training method: cosplace (classification over class groups) or netvlad (triplets)."),
    dataset: Path = typer.Option(..., "--dataset", help="Dataset root with images/{train,val,test}/{database,queries} and `@utm_east@utm_north@...` names (train images are read recursively)."),
    out: Path = typer.Option(..., "--out", help="Run directory (runs/NAME): config.json, last.pt, best.pt, log.jsonl, caches."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last.pt (same options; --epochs may grow)."),
    epochs: int = typer.Option(20, "--epochs", min=1, max=100_000, help="Number of epochs (the paper uses 50)."),
    iterations_per_epoch: int = typer.Option(1000, "--iterations-per-epoch", min=1, max=INT32_MAX, help="Optimiser steps per epoch (the paper uses 10000)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, max=MAX_BATCH, help="Images per step."),
    lr: Optional[float] = typer.Option(None, "--lr", callback=POSITIVE, help="Backbone + head learning rate. Default: 1e-5 (paper) with --pretrained, 3e-4 from random init; netvlad: 1e-4."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Random seed (weights, sampling, augmentation)."),
    backbone: str = typer.Option("resnet18", "--backbone", help="resnet18, resnet50, resnet101 or vgg16."),
    layer: int = typer.Option(4, "--layer", min=3, max=4, help="ResNet stage to cut after (4, or 3)."),
    dim: int = typer.Option(512, "--dim", min=1, max=MAX_DIM, help="Descriptor size."),
    resize: str = typer.Option("240x320", "--resize", help="Input size HEIGHTxWIDTH images are resized to."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="ImageNet backbone weights: a local torchvision .pth file (or a torchvision weights name, needs internet)."),
    val_split: str = typer.Option("val", "--val-split", help="Split whose database/queries give recall@1/5 after each epoch."),
    workers: int = typer.Option(2, "--workers", min=0, max=MAX_WORKERS, help="DataLoader worker processes for decoding images."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="Automatic mixed precision (CUDA only; ignored on CPU)."),
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
    freeze_early: Optional[bool] = typer.Option(None, "--freeze-early/--train-all-layers", help="[cosplace] Freeze ResNet conv1..layer2 / VGG conv1..conv4 as in the paper. Default: freeze only with --pretrained."),
    brightness: float = typer.Option(0.7, "--brightness", callback=NON_NEGATIVE, help="[cosplace] Colour jitter brightness (0 disables)."),
    contrast: float = typer.Option(0.7, "--contrast", callback=NON_NEGATIVE, help="[cosplace] Colour jitter contrast (0 disables)."),
    saturation: float = typer.Option(0.7, "--saturation", callback=NON_NEGATIVE, help="[cosplace] Colour jitter saturation (0 disables)."),
    hue: float = typer.Option(0.5, "--hue", callback=number_range(0, 0.5), help="[cosplace] Colour jitter hue, at most 0.5 (0 disables)."),
    crop_scale: float = typer.Option(0.75, "--crop-scale", callback=number_range(0, 1, low_open=True), help="[cosplace] Smallest area fraction of the random resized crop (1 disables)."),
    clusters: int = typer.Option(64, "--clusters", min=2, max=MAX_CLUSTERS, help="[netvlad] NetVLAD clusters K; the descriptor has K x backbone-channels dims."),
    triplet_margin: float = typer.Option(0.1, "--triplet-margin", callback=POSITIVE, help="[netvlad] Triplet margin m on squared L2 distances (the paper's 0.1)."),
    negatives: int = typer.Option(10, "--negatives", min=1, max=MAX_BATCH, help="[netvlad] Hard negatives per query; a step holds --batch-size // (2 + negatives) tuples."),
    neg_samples: int = typer.Option(1000, "--neg-samples", min=1, max=INT32_MAX, help="[netvlad] Random negatives drawn per query at each mining, besides its remembered hardest."),
    cache_refresh: int = typer.Option(1000, "--cache-refresh", min=1, max=INT32_MAX, help="[netvlad] Queries mined per refresh of the feature cache."),
    mining_subset: Optional[int] = typer.Option(None, "--mining-subset", min=1, max=INT32_MAX, help="[netvlad] Partial mining for large databases: cache this many random database images per refresh (default: all)."),
    pos_radius: float = typer.Option(10.0, "--pos-radius", callback=POSITIVE, help="[netvlad] Potential positives: database images within this many metres of the query."),
    neg_radius: float = typer.Option(25.0, "--neg-radius", callback=POSITIVE, help="[netvlad] Negatives: database images farther than this many metres."),
    optimizer: str = typer.Option("adam", "--optimizer", help="[netvlad] adam or sgd (momentum 0.9, as in the paper)."),
    weight_decay: float = typer.Option(0.001, "--weight-decay", callback=NON_NEGATIVE, help="[netvlad] Weight decay."),
    lr_step: int = typer.Option(5, "--lr-step", min=1, max=INT32_MAX, help="[netvlad] Multiply the learning rate by --lr-gamma every this many epochs."),
    lr_gamma: float = typer.Option(0.5, "--lr-gamma", callback=POSITIVE, help="[netvlad] Learning-rate decay factor."),
    init_images: int = typer.Option(500, "--init-images", min=1, max=INT32_MAX, help="[netvlad] Random database images whose local features are clustered to initialise NetVLAD."),
    init_per_image: int = typer.Option(100, "--init-per-image", min=1, max=INT32_MAX, help="[netvlad] Local features sampled per image for the clustering."),
    clusters_cache: Optional[Path] = typer.Option(None, "--clusters-cache", help="[netvlad] HDF5 file of the k-means clusters, reused when it matches (default: OUT/clusters.h5)."),
    pca_dim: int = typer.Option(4096, "--pca-dim", min=0, max=MAX_DIM, help="[netvlad] PCA-whitening dims stored in best.pt after training (0: none; capped below the number of training database images)."),
) -> None:
    """Train a place-recognition model; checkpoints work with `vpr build-index --checkpoint`."""
    if method not in METHODS:
        raise UsageError(f"--method {method}: choose one of {', '.join(METHODS)}")
    if method == "netvlad":
        _train_netvlad(NetVLADTrainConfig(
            dataset=dataset, out=out, backbone=backbone, layer=layer, num_clusters=clusters, input_size=parse_size(resize),
            pretrained=pretrained, epochs=epochs, iterations_per_epoch=iterations_per_epoch,
            batch_size=max(1, batch_size // (2 + negatives)), cache_refresh=cache_refresh, pos_radius=pos_radius,
            neg_radius=neg_radius, margin=triplet_margin, num_negatives=negatives, neg_samples=neg_samples,
            mining_subset=mining_subset, optimizer=optimizer, lr=DEFAULT_LR if lr is None else lr,
            weight_decay=weight_decay, lr_step=lr_step, lr_gamma=lr_gamma, init_images=init_images,
            init_per_image=init_per_image, clusters_cache=clusters_cache, pca_dim=pca_dim, val_split=val_split,
            seed=seed, device=resolve_device(device), amp=amp, workers=workers,
        ), resume, json_out)
        return
    config = CosPlaceConfig(
        dataset=str(dataset), out=str(out), backbone=backbone, layer=layer, dim=dim, input_size=parse_size(resize),
        pretrained=pretrained, epochs=epochs, iterations_per_epoch=iterations_per_epoch, batch_size=batch_size,
        lr=lr, classifier_lr=classifier_lr, freeze_early=freeze_early,
        groups=GroupParams(M=cell_m, alpha=alpha, N=cell_n, L=sector_l, min_images_per_class=min_images_per_class),
        groups_num=groups_num, scale=scale, margin=margin,
        augment=AugmentParams(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, crop_scale=crop_scale),
        amp=amp, val_split=val_split, seed=seed, device=resolve_device(device), workers=workers,
    )
    _train_cosplace(config, resume, json_out)


def _train_cosplace(config: CosPlaceConfig, resume: bool, json_out: bool) -> None:
    start = time.perf_counter()
    with training_bar(enabled=not json_out) as progress:
        result = train_cosplace(
            config, resume=resume, progress=progress,
            on_epoch=None if json_out else (lambda record: console.print(_epoch_line(record))),
        )
    summary = {
        "run": str(result.run_dir), "last": str(result.last), "best": str(result.best), "best_R@1": result.best_r1,
        "groups_used": result.groups_used, "epochs_run": len(result.records), "seconds": round(time.perf_counter() - start, 1),
    }
    if json_out:
        print_json({**summary, "epochs": result.records})
        return
    console.print(f"best R@1 {result.best_r1:.2f} -> {result.best}; resume with --resume --out {result.run_dir}")


def _netvlad_epoch_line(record: dict) -> str:
    recall = record["recall"]
    return (
        f"epoch {record['epoch']}: loss {record['loss']:.4f} ({record['tuples']} tuples, {record['skipped_queries']} queries "
        f"without a violating negative) R@1 {recall['R@1']:.2f} R@5 {recall['R@5']:.2f} {record['images_per_s']:.1f} img/s"
    )


def _train_netvlad(config: NetVLADTrainConfig, resume: bool, json_out: bool) -> None:
    with training_bar(enabled=not json_out) as progress:
        result = train_netvlad(
            config, resume=resume, progress=progress,
            on_epoch=None if json_out else (lambda record: console.print(_netvlad_epoch_line(record))),
        )
    summary = {
        "run": str(result.run_dir), "last": str(result.last), "best": str(result.best), "best_epoch": result.best_epoch,
        "best_recall": result.best_recall, "pca_dim": result.pca_dim, "epochs_run": len(result.history),
        "seconds": round(result.seconds, 1),
    }
    if json_out:
        print_json({**summary, "epochs": result.history})
        return
    pca = f", PCA-whitened to {result.pca_dim} dims" if result.pca_dim else ""
    console.print(f"best epoch {result.best_epoch} (R@5 {result.best_recall.get('R@5', 0.0):.2f}) -> {result.best}{pca}; "
                  f"resume with --resume --out {result.run_dir}")
