"""Search at scale: an ivfpq index over 1M-10M synthetic descriptors built from an HDF5 file in chunks,
then queried in a fresh process (load + queries): build time, size on disk, query RSS, ms/query, and
top-1 agreement with exact search (computed chunk-wise on the file).

    .venv/bin/python docs/measurements/search_scale.py --sizes 1000000 10000000 --workdir /tmp/vpr-scale
    .venv/bin/python docs/measurements/search_scale.py --sizes 10000000 --workdir /tmp/vpr-scale --reuse-index --cold

The second form measures the queries again on the index the first built, from disk (page cache dropped).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from vpr import api

DIM = 256
CENTRES = 16384
CHUNK = 1 << 18
RESULTS = Path(__file__).parent / "results" / "search_scale.json"

QUERY_SCRIPT = """
import json, sys, time
import numpy as np
from vpr import api
index, queries = sys.argv[1], np.load(sys.argv[2])
t0 = time.perf_counter(); loaded = api.Index.load(index, device="cpu"); load_s = time.perf_counter() - t0
single = []
for q in queries:
    t = time.perf_counter(); loaded.search(q[None], 5); single.append(time.perf_counter() - t)
t = time.perf_counter(); results = loaded.search(queries, 5); batched = time.perf_counter() - t
print(json.dumps({"load_s": load_s, "ms_single_p50": 1e3 * float(np.median(single)),
                  "ms_batched": 1e3 * batched / len(queries), "rss_mb": api.rss_bytes() / 2**20,
                  "peak_rss_mb": api.peak_rss_bytes() / 2**20, "top1": [r.matches[0].id for r in results]}))
"""


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_descriptors(path: Path, n: int, seed: int) -> None:
    """`n` clustered unit vectors (a random centre plus noise), written `CHUNK` rows at a time."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((CENTRES, DIM)))
    with h5py.File(path, "w") as f:
        out = f.create_dataset("descriptors", shape=(n, DIM), dtype=np.float32)
        for start in range(0, n, CHUNK):
            rows = min(CHUNK, n - start)
            out[start:start + rows] = unit(centres[rng.integers(CENTRES, size=rows)]
                                           + 0.08 * rng.standard_normal((rows, DIM)).astype(np.float32))


def queries_near(path: Path, count: int, seed: int) -> np.ndarray:
    """Queries: random database rows moved by noise (a revisit of a known place)."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "r") as f:
        stored = f["descriptors"]
        rows = stored[np.sort(rng.choice(len(stored), count, replace=False))]
    return unit(rows + 0.04 * rng.standard_normal(rows.shape).astype(np.float32))


def build(n: int, source: Path, index: Path) -> dict:
    """Build the ivfpq index over `source` in this process: its time and peak RSS (the peak reset first,
    so writing the source does not count), and the RSS with the N image paths alone (any build of N holds them)."""
    api.reset_peak_rss()
    database = api.GeoImageSet(paths=[Path(f"/synthetic/{i}.jpg") for i in range(n)])
    paths_mb = api.rss_bytes() / 2**20
    model, _ = api.new_model(descriptor_dim=DIM, input_size=(48, 64))
    t0 = time.perf_counter()
    api.index_descriptors(source, index, model=model, database=database, kind="ivfpq", source="synthetic")
    return {"build_s": round(time.perf_counter() - t0, 1), "build_peak_rss_mb": round(api.peak_rss_bytes() / 2**20),
            "rss_with_paths_mb": round(paths_mb)}


def drop_page_cache() -> None:
    """Empty Linux's page cache (root only), so the queries read database.h5 from disk, as on a machine
    whose RAM cannot hold it."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError as exc:
        sys.exit(f"--cold: cannot drop the page cache ({exc.strerror}); run as root, or without --cold")


def run_size(n: int, workdir: Path, queries: int, built: dict | None, cold: bool) -> dict:
    """Build an ivfpq index over `n` synthetic descriptors (unless `built` holds the figures of the
    index already in `workdir`) and measure it (`cold`: with the page cache dropped first)."""
    source, index = workdir / f"descriptors-{n}.h5", workdir / f"ivfpq-{n}"
    if not source.exists():
        write_descriptors(source, n, seed=n)
    built = built or build(n, source, index)
    q = queries_near(source, queries, seed=1)
    np.save(workdir / f"queries-{n}.npy", q)
    if cold:
        drop_page_cache()
    out = subprocess.run([sys.executable, "-c", QUERY_SCRIPT, str(index), str(workdir / f"queries-{n}.npy")],
                         check=True, capture_output=True, text=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    t0 = time.perf_counter()
    with h5py.File(source, "r") as f:
        _, exact = api.exact_search(f["descriptors"], q, 1)
    exact_s = time.perf_counter() - t0
    agreement = float(np.mean(np.asarray(measured.pop("top1")) == exact[:, 0]))
    size = {name: (index / name).stat().st_size / 2**20 for name in ("index.faiss", "database.h5")}
    return {"images": n, "dim": DIM, **built,
            "index_faiss_mb": round(size["index.faiss"]), "database_h5_mb": round(size["database.h5"]),
            "query_rss_mb": round(measured["rss_mb"]), "query_peak_rss_mb": round(measured["peak_rss_mb"]),
            "load_s": round(measured["load_s"], 2), "ms_single_p50": round(measured["ms_single_p50"], 2),
            "ms_batched": round(measured["ms_batched"], 2), "top1_agreement_exact": agreement,
            "queries": queries, "exact_search_s": round(exact_s, 1),
            "page_cache": "dropped" if cold else "as the build left it"}


def table(rows: list[dict]) -> str:
    head = ("| images | build (s) | build peak RSS (MB) | RSS before the build, with the N paths (MB) | index.faiss (MB) "
            "| database.h5 (MB) | query RSS (MB) | query peak RSS (MB) | ms/query single p50 | ms/query batched "
            "| top-1 = exact |\n" + "|---" * 11 + "|\n")
    return head + "".join(
        f"| {r['images']:,} | {r['build_s']} | {r['build_peak_rss_mb']} | {r.get('rss_with_paths_mb', '-')} "
        f"| {r['index_faiss_mb']} | {r['database_h5_mb']} | {r['query_rss_mb']} | {r['query_peak_rss_mb']} "
        f"| {r['ms_single_p50']} | {r['ms_batched']} | {r['top1_agreement_exact']:.2f} |\n" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vpr-search-scale"))
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before the queries (root)")
    parser.add_argument("--reuse-index", action="store_true",
                        help="measure the queries of an index a previous run built in --workdir, keeping its build figures")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    for n in args.sizes:  # one process per size: the build peak RSS is that size's alone
        if n != args.sizes[0]:
            subprocess.run([sys.executable, __file__, "--sizes", str(n), "--workdir", str(args.workdir),
                            "--queries", str(args.queries), *(["--reuse-index"] if args.reuse_index else []), *(["--cold"] if args.cold else [])], check=True)
            rows = json.loads(RESULTS.read_text())["rows"]
            continue
        built = None
        if args.reuse_index:
            previous = [r for r in rows if r["images"] == n]
            if not previous or not (args.workdir / f"ivfpq-{n}").is_dir():
                sys.exit(f"--reuse-index: no index of {n:,} in {args.workdir} with figures in {RESULTS}; run without it")
            built = {k: previous[0][k] for k in ("build_s", "build_peak_rss_mb", "rss_with_paths_mb") if k in previous[0]}
        row = run_size(n, args.workdir, args.queries, built, args.cold)
        rows = sorted([r for r in rows if r["images"] != n] + [row], key=lambda r: r["images"])
        api.write_json(RESULTS, {"rows": rows, "table": table(rows)})
        print(json.dumps(row), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
