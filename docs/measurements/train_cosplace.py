"""Benchmark: CosPlace training from random init on a synthetic city, on the CPU.

Renders the city if needed (data/demo-city-PRESET, the same one `vpr demo` uses), measures
recall@1/5/10 on its test split with the untrained model, trains with `train_cosplace`, measures the
best checkpoint (by validation R@1, ties by R@5) and the last one on the same split, and writes a JSON with the
figures, the training time and the images/s.

The defaults fit ~15 minutes on an idle 2-core CPU (about 25 on a shared one): the small city's
native 120x160 input, 6 epochs x 120 iterations of 32 images (6 groups), lr 3e-4 and mild
augmentation. In GPU sweeps on this city, short runs gained with mild jitter and lost with the
paper's strong one (brightness/contrast/saturation 0.7, hue 0.5), which pays off only over
thousands of iterations.

    OMP_NUM_THREADS=1 .venv/bin/python docs/measurements/train_cosplace.py --preset small
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from vpr import api
from vpr.api import AugmentParams, CosPlaceConfig, ExtractOptions, GroupParams


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="synthetic city preset (tiny, small, medium, large)")
    parser.add_argument("--data", type=Path, default=None, help="dataset folder (default data/demo-city-PRESET)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default runs/bench-cosplace-PRESET, replaced)")
    parser.add_argument("--json", type=Path, default=None, help="result file (default bench_results/train_cosplace_PRESET.json)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=120, help="iterations per epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resize", default="120x160", help="HEIGHTxWIDTH model input (the small city renders 160x120)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--lr", type=float, default=None, help="backbone lr (default: the trainer's from-scratch value)")
    parser.add_argument("--classifier-lr", type=float, default=1e-2)
    parser.add_argument("--M", type=float, default=20.0, help="class cell side: the small city's train split is sparse, so 20 m")
    parser.add_argument("--alpha", type=float, default=30.0)
    parser.add_argument("--N", type=int, default=5)
    parser.add_argument("--L", type=int, default=2)
    parser.add_argument("--min-images-per-class", type=int, default=3)
    parser.add_argument("--groups-num", type=int, default=8)
    parser.add_argument("--jitter", type=float, default=0.3, help="brightness/contrast/saturation jitter (paper: 0.7)")
    parser.add_argument("--hue", type=float, default=0.0, help="hue jitter (paper: 0.5)")
    parser.add_argument("--crop-scale", type=float, default=0.9, help="smallest random-crop area (reference code: 0.5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def test_recall(model, database, queries, args) -> dict[str, float]:
    recalls = api.recall(model, database, queries, ns=(1, 5, 10), options=ExtractOptions(batch_size=32, num_workers=args.workers))
    return {f"R@{n}": round(v, 2) for n, v in recalls.items()}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    data = args.data or Path("data") / f"demo-city-{args.preset}"
    out = args.out or Path("runs") / f"bench-cosplace-{args.preset}"
    result_path = args.json or Path("bench_results") / f"train_cosplace_{args.preset}.json"
    if not data.exists():
        api.synth(data, preset=args.preset, seed=0)
    if out.exists():
        shutil.rmtree(out)
    height, width = (int(v) for v in args.resize.split("x"))
    config = CosPlaceConfig(
        dataset=str(data), out=str(out), dim=args.dim, input_size=(height, width), epochs=args.epochs,
        iterations_per_epoch=args.iterations, batch_size=args.batch_size, lr=args.lr, classifier_lr=args.classifier_lr,
        groups=GroupParams(M=args.M, alpha=args.alpha, N=args.N, L=args.L, min_images_per_class=args.min_images_per_class),
        groups_num=args.groups_num,
        augment=AugmentParams(brightness=args.jitter, contrast=args.jitter, saturation=args.jitter, hue=args.hue, crop_scale=args.crop_scale), seed=args.seed, device="cpu", workers=args.workers,
    )
    database, queries = api.split(data, "test")
    start = time.perf_counter()
    before = test_recall(api.new_model(config.model_config(), seed=args.seed)[0], database, queries, args)
    eval_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = api.train(config)
    run_seconds = time.perf_counter() - start
    train_seconds = sum(r["train_seconds"] for r in result.records)
    images = args.epochs * args.iterations * args.batch_size
    after_best = test_recall(api.load_model(result.best)[0], database, queries, args)
    best_epoch = result.best_epoch
    last_is_best = best_epoch == result.records[-1]["epoch"]
    after_last = after_best if last_is_best else test_recall(api.load_model(result.last)[0], database, queries, args)
    report = {
        "benchmark": "train_cosplace", "preset": args.preset, "dataset": str(data), "run": str(out),
        "test_split": {"database": len(database), "queries": len(queries)},
        "config": config.resolved().to_dict(), **result.extras,
        "recall_before": before, "recall_after_best": after_best, "recall_after_last": after_last,
        "best_epoch": best_epoch, "best_epoch_val_recall": result.best_recall, "epochs": result.records,
        "train_seconds": round(train_seconds, 1), "run_seconds_with_validation": round(run_seconds, 1),
        "test_eval_seconds": round(eval_seconds, 1), "images_trained": images,
        "train_images_per_second": round(images / train_seconds, 2),
        "machine": {"cpu_count": os.cpu_count(), "load_average_1m_at_end": round(os.getloadavg()[0], 2), "torch_threads": args.threads, "torch": torch.__version__, "python": platform.python_version()},
    }
    api.write_json(result_path, report)
    print(json.dumps({k: report[k] for k in ("recall_before", "recall_after_best", "recall_after_last", "train_seconds", "train_images_per_second")}, indent=2))
    print(f"wrote {result_path}")


if __name__ == "__main__":
    main()
