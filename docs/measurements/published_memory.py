"""build-index peak memory at MegaLoc's descriptor size: 10k images -> 8448-d descriptors -> PCA -> index,
each run in a fresh `vpr build-index` process (peak RSS from the kernel).

The model is MegaLoc's head (8448-d) on a one-block DINOv2 ViT-S/14, so that 10k images extract in
minutes on a CPU; the full MegaLoc weights add their own size (reported separately: a fresh process
that loads a MegaLoc-layout file of ViT-B/14). Images are hard links to a few small JPEGs (distinct
paths, no extra disk).

    .venv/bin/python docs/measurements/published_memory.py --images 10000 --workdir /tmp/vpr-megaloc-mem
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vpr import api

RESULTS = Path(__file__).parent / "results" / "published_memory.json"
VPR = str(Path(sys.executable).parent / "vpr")


def images(folder: Path, count: int) -> Path:
    """`count` distinct @-named paths (hard links to 16 random 126x126 JPEGs) in `folder`/db."""
    db = folder / "db"
    db.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sources = []
    for i in range(16):
        source = folder / f"source{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (126, 126, 3), dtype=np.uint8)).save(source, quality=90)
        sources.append(source)
    for i in range(count):
        path = db / f"@{550000 + i * 5:.2f}@{4180000 + (i % 97) * 3:.2f}@10@S@{i:06d}.jpg"
        if not path.exists():
            os.link(sources[i % len(sources)], path)
    return db


def peak_of(args: list[str]) -> dict:
    """Run `args` under /usr/bin/time -v: seconds and peak RSS in MB."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    rss_kb = next(int(line.split()[-1]) for line in done.stderr.splitlines() if "Maximum resident set size" in line)
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(rss_kb / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vpr-megaloc-mem"))
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    db = images(work, args.images)
    preprocessing = dict(input_size=(126, 126), multiple=14, resampler="torch")
    small, _ = api.new_model("dinov2_vits14", backbone_options={"blocks": 1}, head="megaloc", **preprocessing)
    api.save_model(small, work / "megaloc_head_vits1.pt")
    full, _ = api.new_model("dinov2_vitb14", head="megaloc", **preprocessing)
    api.save_model(full, work / "megaloc_vitb14.pt")
    rows = []
    for label, extra in (("flat, no PCA", ["--index", "flat"]), ("PCA 512 + flat", ["--pca-dim", "512", "--index", "flat"]),
                         ("PCA 256 + ivfpq", ["--pca-dim", "256", "--index", "ivfpq"])):
        out = work / f"index-{len(rows)}"
        run = peak_of([VPR, "build-index", str(db), "--checkpoint", str(work / "megaloc_head_vits1.pt"), "--out", str(out),
                       "--no-cache", "--batch-size", "64", "--workers", "1", "--json", *extra])
        rows.append({"case": label, "images": args.images, "descriptor_dim": small.config.descriptor_dim, **run,
                     "index_mb": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 1)})
        print(rows[-1], flush=True)
    out = work / "index-spilled"
    script = ("import sys; from vpr import api; model, pca = api.load_model(sys.argv[1]); "
              "api.build_index(sys.argv[2], sys.argv[3], model=model, model_pca=pca, options=api.BuildOptions("
              "pca_dim=256, kind='ivfpq', cache=False, extract=api.ExtractOptions(batch_size=64, num_workers=1), spill_bytes=0))")
    run = peak_of([sys.executable, "-c", script, str(work / "megaloc_head_vits1.pt"), str(db), str(out)])
    rows.append({"case": "PCA 256 + ivfpq, spilled to disk (library, spill_bytes=0)", "images": args.images,
                 "descriptor_dim": small.config.descriptor_dim, **run,
                 "index_mb": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 1)})
    print(rows[-1], flush=True)
    model_only = peak_of([sys.executable, "-c", "import sys; from vpr import api; api.load_model(sys.argv[1])",
                          str(work / "megaloc_vitb14.pt")])
    result = {"rows": rows, "megaloc_vitb14_load_peak_rss_mb": model_only["peak_rss_mb"],
              "descriptors_mb": round(args.images * small.config.descriptor_dim * 4 / 2**20, 1), "cpus": os.cpu_count()}
    api.write_json(RESULTS, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
