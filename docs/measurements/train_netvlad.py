"""Benchmark NetVLAD training on a synthetic city: recall@1/5/10 on the test split before and after.

"Before" is the model training starts from (seeded random backbone, NetVLAD head initialised from
k-means clusters); "after" is the run's best.pt, with full descriptors and with its PCA-whitening
(what `vpr build-index --checkpoint best.pt` applies). Exact search, positives within 25 m. Writes a
JSON report; not a test.

    OMP_NUM_THREADS=2 .venv/bin/python docs/measurements/train_netvlad.py --out docs/measurements/results/train_netvlad.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from vpr import api
from vpr.api import ExtractOptions, NetVLADConfig

NS = (1, 5, 10)


def test_recalls(model, pca, dataset: Path, cfg: NetVLADConfig) -> dict[str, dict[str, float]]:
    """Recall@1/5/10 (percent, exact search, 25 m) on the test split: full descriptors, and PCA'd when given."""
    database, queries = api.split(dataset, "test")
    options = ExtractOptions(batch_size=cfg.extract_batch_size, num_workers=cfg.workers, device=cfg.device)
    variants = {"full": None, **({"wpca": pca} if pca is not None else {})}
    return {name: {f"R@{n}": round(v, 2) for n, v in api.recall(model, database, queries, pca=projection, ns=NS,
                                                                  options=options).items()}
            for name, projection in variants.items()}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=Path("data/bench-city-small"), help="synthetic city (rendered if missing)")
    parser.add_argument("--preset", default="small", help="preset used when the city must be rendered")
    parser.add_argument("--out", type=Path, default=Path("docs/measurements/results/train_netvlad.json"), help="JSON report")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--clusters", type=int, default=16)
    parser.add_argument("--resize", default="96x128", help="HEIGHTxWIDTH")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--iterations-per-epoch", type=int, default=0, help="0: a full pass over the train queries")
    parser.add_argument("--tuples-per-step", type=int, default=4)
    parser.add_argument("--negatives", type=int, default=3)
    parser.add_argument("--mining-subset", type=int, default=500)
    parser.add_argument("--cache-refresh", type=int, default=1000)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--lr", type=float, default=3e-4, help="best for a short budget in a GPU sweep of 1e-4, 3e-4, 1e-3")
    parser.add_argument("--lr-step", type=int, default=2)
    parser.add_argument("--lr-gamma", type=float, default=0.5)
    parser.add_argument("--pca-dim", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if not (args.dataset / "images").is_dir():
        logging.info("rendering the '%s' city into %s", args.preset, args.dataset)
        api.synth(args.dataset, preset=args.preset, seed=0)
    height, width = (int(v) for v in args.resize.split("x"))
    with tempfile.TemporaryDirectory(prefix="bench-netvlad-") as tmp:
        workdir = Path(tmp)
        cfg = NetVLADConfig(
            dataset=args.dataset, out=workdir / "run", backbone=args.backbone, layer=args.layer,
            num_clusters=args.clusters, input_size=(height, width), epochs=args.epochs,
            iterations_per_epoch=args.iterations_per_epoch or None,
            batch_size=args.tuples_per_step * (2 + args.negatives),
            num_negatives=args.negatives, mining_subset=args.mining_subset, cache_refresh=args.cache_refresh,
            optimizer=args.optimizer, lr=args.lr, lr_step=args.lr_step, lr_gamma=args.lr_gamma, pca_dim=args.pca_dim, workers=args.workers, device=args.device,
            seed=args.seed, clusters_cache=workdir / "clusters.h5",
        )
        train_database, _ = api.split(args.dataset, "train")
        tic = time.perf_counter()
        model, clusters = api.netvlad_start(cfg.resolved(), train_database)
        init_seconds = time.perf_counter() - tic
        before = test_recalls(model, None, args.dataset, cfg)["full"]
        logging.info("before training: %s", before)
        tic = time.perf_counter()
        result = api.train(cfg, on_epoch=lambda r: logging.info("epoch %d: %s", r["epoch"], r))
        train_seconds = time.perf_counter() - tic
        trained, pca = api.load_model(result.best)
        after = test_recalls(trained, pca, args.dataset, cfg)
    images = sum(r["images"] for r in result.records)
    step_seconds = sum(r["train_seconds"] for r in result.records)
    report = {
        "benchmark": "train_netvlad", "command": " ".join(sys.argv), "dataset": str(args.dataset),
        "split_sizes": {s: [len(x) for x in api.split(args.dataset, s)] for s in ("train", "val", "test")},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "descriptor_dim": trained.config.descriptor_dim, "pca_dim": result.extras["pca_dim"],
        "clusters": {"k": args.clusters, "alpha": round(clusters.alpha, 3), "features": clusters.num_features,
                     "seconds": round(init_seconds, 1)},
        "recall_before": before, "recall_after": after["full"], "recall_after_wpca": after.get("wpca"),
        "best_epoch": result.best_epoch, "val_recall_best": result.best_recall,
        "train_seconds": round(train_seconds, 1), "images_trained": images,
        "train_images_per_s": round(images / step_seconds, 2) if step_seconds else None,
        "train_images_per_s_incl_mining_and_validation": round(images / train_seconds, 2),
        "epochs": result.records, "total_seconds": round(time.perf_counter() - start, 1),
        "machine": {"device": args.device, "torch_threads": args.threads, "cpu": platform.processor() or platform.machine(),
                    "torch": torch.__version__},
    }
    api.write_json(args.out, report)
    print(json.dumps({k: report[k] for k in ("recall_before", "recall_after", "recall_after_wpca", "train_seconds",
                                             "train_images_per_s", "total_seconds")}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
