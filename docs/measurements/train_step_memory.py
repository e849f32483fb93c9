"""Peak memory and time of one place-batch training step on the CPU: SALAD's recipe (DINOv2 ViT-B/14, last 4 blocks
trained, 224 x 224) at 16 places x 4 images, against the same step with every block trained.

Each case runs in a fresh process (peak RSS from the kernel, after the model is built, so the figure is the step's
own on top of the weights): forward of the 64 images, the multi-similarity miner and loss, backward, AdamW step.
Frozen blocks run without gradients (autograd records nothing before the first trained block), so their
activations are freed as they are used.

    OMP_NUM_THREADS=2 .venv/bin/python docs/measurements/train_step_memory.py
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "train_step_memory.json"


def one_step(recipe: str, backbone: str, size: int, places: int, per_place: int, train_blocks: int | None, queue) -> None:
    """Build the model, then time one step and read the peak RSS it added."""
    import torch

    from vpr import api

    config = api.PlaceBatchConfig(dataset=".", out="o", recipe=recipe, backbone=backbone, train_blocks=train_blocks,
                                  input_size=(size, size)).resolved()
    model, _ = api.new_model(config.model_config())
    frozen = api.freeze_blocks(model, train_blocks)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay)
    loss_fn, miner = api.multi_similarity()
    images = torch.randn(places * per_place, 3, size, size)
    labels = torch.arange(places).repeat_interleave(per_place)
    base = api.rss_bytes()
    api.reset_peak_rss()
    tic = time.perf_counter()
    descriptors = model(images)
    loss = loss_fn(descriptors, labels, miner(descriptors, labels))
    opt.zero_grad()
    loss.backward()
    opt.step()
    seconds = time.perf_counter() - tic
    queue.put({"recipe": recipe, "backbone": backbone, "size": size, "batch": f"{places}x{per_place}",
               "train_blocks": "all" if train_blocks is None else train_blocks, "frozen_parts": frozen,
               "trained_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "model_rss_mb": round(base / 2**20), "step_peak_rss_mb": round((api.peak_rss_bytes() - base) / 2**20),
               "process_peak_rss_mb": round(api.peak_rss_bytes() / 2**20), "step_seconds": round(seconds, 1),
               "images_per_second": round(places * per_place / seconds, 2)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dinov2_vitb14")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--places", type=int, default=16)
    parser.add_argument("--per-place", type=int, default=4)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    rows = []
    for blocks in (4, None):
        queue = context.Queue()
        worker = context.Process(target=one_step, args=("salad", args.backbone, args.size, args.places, args.per_place,
                                                        blocks, queue))
        worker.start()
        rows.append(queue.get())
        worker.join()
        print(json.dumps(rows[-1]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "cases": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
