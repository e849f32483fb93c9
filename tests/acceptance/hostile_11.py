"""Hostile inputs of issue 11: the evidence table for its closing note ("Never lose a user's files ...").

Reproduces every hostile-user case of issue 11 in a fresh temporary folder ($TMP) by running the real
`vpr` CLI in subprocesses, and records for each case: the command, the exit code, the first line of
output (stderr, or stdout when stderr is empty), whether the user's files survived byte for byte
(sha256 of every file in the protected folders before and after, for the cases that could lose data),
the case's own checks, problems spotted in the output (a traceback, an 'unexpected' error, a
multi-line message, files changed or lost) and whether the case behaved as issue 11 asks. It prints
a Markdown table and writes the cases as a JSON list.

For click's usage errors (a `Usage:` line, a hint and an `Error:` line) the table shows the `Error:`
line; the JSON keeps both `first_line` and that `message`. Every build uses the tiny settings
`--resize 48x64 --dim 64 --workers 0 --device cpu`; the query and eval cases share one index.
About 6 CPU-minutes, nearly all of them ~60 CLI starts importing torch (5-6 s each), run two at a time:
3-4 minutes on an idle 2-core CPU, 6-7 on one shared with other work.

    .venv/bin/python tests/acceptance/hostile_11.py [--out hostile_11.json] [--jobs 2] [--keep]

Case 44 makes the index immutable with `chattr +i` (root on a filesystem with attributes), as a
read-only index; where that is refused the case is marked not reproducible.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from harness import (
    REFUSE, USAGE, WORK, Case, Lab, build_args, copy_images, main, run, snapshot, survived, user_folder, write_places,
)
from vpr.data.geo import format_at_name

from hostile_11_outputs import (
    concurrent_builds, immutable_index, interrupt, output_paths, train_resume, training_outputs,
)

# Wrong results (cases 13-21).

def wrong_models_and_labels(lab: Lab) -> list[Case]:
    """Cases 13-15 and 20: NaN weights, a manifest over two UTM zones, a folder mixing `@` and plain names, --pca-dim 0."""
    import torch

    from vpr.models.checkpoints import save_checkpoint
    from vpr.models.model import ModelConfig, build_model

    base = lab.root / "wrong"
    base.mkdir()
    torch.set_num_threads(1)
    model = build_model(ModelConfig(backbone="resnet18", head="cosplace", descriptor_dim=64, input_size=(48, 64)), seed=0)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    save_checkpoint(model, base / "nan.pt")
    result = run(build_args(lab.db, base / "idx13", "--checkpoint", str(base / "nan.pt")))
    cases = [lab.case("13", "build-index --checkpoint with a NaN weight", result, REFUSE,
                      ok=not (base / "idx13").exists(), out_created=(base / "idx13").exists())]
    images = copy_images(lab.db, base / "zones", 2)
    rows = [f"{p.name},{p.name.split('@')[1]},{p.name.split('@')[2]},{zone}" for p, zone in zip(images, ("10S", "11S"))]
    (base / "zones" / "zones.csv").write_text("path,utm_east,utm_north,zone\n" + "\n".join(rows) + "\n")
    result = run(build_args(base / "zones" / "zones.csv", base / "idx14"))
    cases.append(lab.case("14", "manifest rows in zones 10S and 11S", result, REFUSE))
    mixed = base / "mixed"
    copy_images(lab.db, mixed, 3)
    shutil.copy(sorted(lab.db.iterdir())[3], mixed / "0001.png")
    cases.append(lab.case("15", "@-named images plus 0001.png", run(build_args(mixed, base / "idx15")), REFUSE))
    cases.append(lab.case("20", "build-index --pca-dim 0", run(build_args(lab.db, base / "idx20", "--pca-dim", "0")), USAGE))
    return cases


def ground_truth_queries(base: Path, lab: Lab) -> Path:
    """A folder of two plainly named queries, q.jpg and r.jpg."""
    queries = base / "queries"
    queries.mkdir(parents=True)
    for name, path in zip(("q.jpg", "r.jpg"), sorted((lab.city / "queries").iterdir())):
        shutil.copy(path, queries / name)
    return queries


def eval_args(queries: Path, lab: Lab, *extra: str) -> list[str]:
    return ["eval", str(queries), "--index", str(lab.index), "--workers", "0", "--device", "cpu", *extra]


def wrong_ground_truth(lab: Lab) -> list[Case]:
    """Cases 16-19: comma-separated positives, duplicate query rows, an ambiguous bare name, --threshold nan."""
    base = lab.root / "gt"
    queries = ground_truth_queries(base, lab)
    cases = []
    for id, name, text in (("16", "ground truth q.jpg,0,1 (comma-separated positives)", "query,positives\nq.jpg,0,1\n"),
                           ("17", "ground truth with a duplicate query row", "query,positives\nq.jpg,0\nq.jpg,1\n")):
        (base / f"gt{id}.csv").write_text(text)
        cases.append(lab.case(id, name, run(eval_args(queries, lab, "--gt", str(base / f"gt{id}.csv"))), REFUSE))
    twins = base / "twins"
    for sub, path in zip("ab", sorted((lab.city / "queries").iterdir())):
        (twins / sub).mkdir(parents=True)
        shutil.copy(path, twins / sub / "q.jpg")
    (base / "gt18.csv").write_text("query,positives\nq.jpg,0\n")
    result = run(eval_args(twins, lab, "--gt", str(base / "gt18.csv")))
    cases.append(lab.case("18", "q.jpg in two sub-folders, bare name in the ground truth", result, REFUSE))
    cases.append(lab.case("19", "eval --threshold nan", run(eval_args(lab.city / "queries", lab, "--threshold", "nan")), USAGE))
    return cases


def tiff_scaling(lab: Lab) -> list[Case]:
    """Case 21: a 32-bit integer TIFF holding 0..255 must load like the 8-bit image."""
    from vpr.data.images import load_rgb

    base = lab.root / "tiff"
    base.mkdir()
    gradient = np.tile(np.arange(256, dtype=np.int32), (16, 1))
    Image.fromarray(gradient).save(base / "gradient.tif")
    Image.fromarray(gradient.astype(np.uint8)).save(base / "gradient.png")
    means = {name: float(np.asarray(load_rgb(base / name)).mean()) for name in ("gradient.tif", "gradient.png")}
    line = f"mean of load_rgb: 32-bit TIFF {means['gradient.tif']:.2f}, 8-bit PNG {means['gradient.png']:.2f}"
    return [lab.note("21", "32-bit integer TIFF ('I') holding 0..255", "load_rgb($TMP/tiff/gradient.tif)", line,
                     ok=abs(means["gradient.tif"] - means["gradient.png"]) < 0.5, tiff_mean=means["gradient.tif"],
                     png_mean=means["gradient.png"])]


# Crashes that must be one-line errors, or now work (cases 22-44).

def query_args(image: Path | str, index: Path, *extra: str) -> list[str]:
    return ["query", str(image), "--index", str(index), "-k", "3", "--device", "cpu", *extra]


def literal_names(lab: Lab) -> list[Case]:
    """Cases 22-24 and 36: bracketed paths and names, and an ASCII-only terminal."""
    base = lab.root / "names"
    source = sorted((lab.city / "queries").iterdir())[0]
    query22 = base / "a[" / "b]c.png"
    query24 = base / "[red]b.png"
    query36 = base / "café.jpg"
    query22.parent.mkdir(parents=True)
    Image.open(source).save(query22)
    Image.open(source).save(query24)
    shutil.copy(source, query36)
    result = run(query_args(query22, lab.index))
    cases = [lab.case("22", "query image at a[/b]c.png", result, WORK, ok=str(query22) in result.stdout,
                      path_in_table=str(query22) in result.stdout)]
    result = run(build_args(lab.db, base / "idx[1]"))
    cases.append(lab.case("23", "build-index --out 'idx[1]'", result, WORK, ok="idx[1]" in result.stdout,
                          literal_name_printed="idx[1]" in result.stdout))
    result = run(query_args(query24, lab.index))
    cases.append(lab.case("24", "query named [red]b.png", result, WORK, ok="[red]b.png" in result.stdout,
                          literal_name_printed="[red]b.png" in result.stdout))
    result = run(query_args(query36, lab.index), env={"PYTHONIOENCODING": "ascii"})
    cases.append(lab.case("36", "PYTHONIOENCODING=ascii vpr query café.jpg", result, WORK,
                          stdout_ascii=result.stdout.isascii()))
    return cases


def bad_image_sets(lab: Lab) -> list[Case]:
    """Cases 25-28: zone number without letter, zone letter I, a non-UTF-8 file name, a UTF-16 manifest."""
    base = lab.root / "sets"
    cases = []
    for id, name, zone in (("25", "@ names with a zone number but no letter", "@10@@"), ("26", "@ names with zone letter I", "@10@I@")):
        folder = base / f"db{id}"
        for path in copy_images(lab.db, folder, 3):
            path.rename(path.with_name(path.name.replace("@10@S@", zone)))
        cases.append(lab.case(id, name, run(build_args(folder, base / f"idx{id}")), REFUSE))
    folder = base / "db27"
    copy_images(lab.db, folder, 3)
    with open(os.fsencode(str(folder)) + b"/\xff.jpg", "wb") as handle:
        handle.write(sorted(lab.db.iterdir())[3].read_bytes())
    cases.append(lab.case("27", "a database file named b'\\xff.jpg' (not UTF-8)", run(build_args(folder, base / "idx27")), REFUSE))
    folder = base / "db28"
    images = copy_images(lab.db, folder, 2)
    text = "path,lat,lon\n" + "".join(f"{p.name},{p.name.split('@')[5]},{p.name.split('@')[6]}\n" for p in images)
    (folder / "utf16.csv").write_bytes(text.encode("utf-16"))
    cases.append(lab.case("28", "a UTF-16 CSV manifest", run(build_args(folder / "utf16.csv", base / "idx28")), REFUSE))
    return cases


def ground_truth_and_options(lab: Lab) -> list[Case]:
    """Cases 29-31: a spaced ground-truth header, a non-numeric positive, out-of-range build options."""
    base = lab.root / "gt2"
    queries = ground_truth_queries(base, lab)
    (base / "gt29.csv").write_text("query, positives\nq.jpg,0\nr.jpg,1\n")
    cases = [lab.case("29", "ground-truth header 'query, positives'", run(eval_args(queries, lab, "--gt", str(base / "gt29.csv"))), WORK)]
    (base / "gt30.csv").write_text("query,positives\nq.jpg,²\n")
    cases.append(lab.case("30", "ground-truth positive '²'", run(eval_args(queries, lab, "--gt", str(base / "gt30.csv"))), REFUSE))
    for suffix, (option, value) in zip("abcde", (("--batch-size", "0"), ("--workers", "-1"), ("--dim", "0"),
                                                  ("--dim", "-5"), ("--clusters", "0"))):
        result = run(build_args(lab.db, base / "idx31", option, value))
        cases.append(lab.case(f"31{suffix}", f"build-index {option} {value}", result, USAGE))
    return cases


def outputs_and_indexes(lab: Lab) -> list[Case]:
    """Cases 32, 33 and 40: --viz/--map naming a directory, a huge --ef-search, an index of unknown kind."""
    base = lab.root / "outputs"
    figures = user_folder(base / "figures")
    query = sorted((lab.city / "queries").iterdir())[0]
    before = snapshot(figures)
    result = run(query_args(query, lab.index, "--viz", str(figures)))
    cases = [lab.case("32a", "query --viz DIR (an existing folder)", result, REFUSE, intact=survived(before, figures))]
    result = run(["groups", str(lab.db), "--map", str(figures)])
    cases.append(lab.case("32b", "groups --map DIR (an existing folder)", result, REFUSE, intact=survived(before, figures)))
    if importlib.util.find_spec("faiss") is None:
        cases.append(lab.note("33", "query --ef-search 1e11 on an hnsw index", "-", "skipped: faiss is not installed", ok=None))
    else:
        built = run(build_args(lab.db, base / "hnsw", "--index", "hnsw"))
        result = run(query_args(query, base / "hnsw", "--ef-search", "100000000000"))
        cases.append(lab.case("33", "query --ef-search 100000000000 on an hnsw index", result, USAGE,
                              ok=built.code == 0, hnsw_build_exit=built.code))
    bogus = base / "bogus"
    shutil.copytree(lab.index, bogus)
    manifest = json.loads((bogus / "manifest.json").read_text())
    (bogus / "manifest.json").write_text(json.dumps({**manifest, "index_kind": "bogus"}))
    cases.append(lab.case("40", "index manifest.json with index_kind 'bogus'", run(query_args(query, bogus)), REFUSE))
    return cases


def manifests(lab: Lab) -> list[Case]:
    """Cases 34, 38 and 39: a `10S` zone cell, a row naming a missing image, a lat cell `"37,7"`."""
    base = lab.root / "manifests"
    images = copy_images(lab.db, base, 2)
    utm = "".join(f"{p.name},{p.name.split('@')[1]},{p.name.split('@')[2]},10S\n" for p in images)
    (base / "zone.csv").write_text("path,utm_east,utm_north,zone\n" + utm)
    cases = [lab.case("34", "manifest zone column '10S'", run(build_args(base / "zone.csv", lab.root / "idx34")), WORK)]
    latlon = [f"{p.name},{p.name.split('@')[5]},{p.name.split('@')[6]}" for p in images]
    (base / "m.csv").write_text("path,lat,lon\n" + f"{latlon[0]}\ngone.jpg,37.7,-122.4\n{latlon[1]}\n")
    result = run(build_args(base / "m.csv", lab.root / "idx38"))
    cases.append(lab.case("38", "manifest row naming a missing image (line 3)", result, REFUSE,
                          ok="m.csv:3" in result.message, names_line="m.csv:3" in result.message))
    (base / "comma.csv").write_text(f'path,lat,lon\n{images[0].name},"37,7",-122.4\n')
    result = run(build_args(base / "comma.csv", lab.root / "idx39"))
    count = result.stderr.count("comma.csv:2:")
    cases.append(lab.case("39", 'manifest lat cell "37,7"', result, REFUSE, ok=count == 1, prefix_count=count))
    return cases


def odd_query_paths(lab: Lab) -> list[Case]:
    """Case 37: a directory given as a query image, and a symlink loop."""
    base = lab.root / "paths"
    (base / "holiday.jpg").mkdir(parents=True)
    (base / "loop.jpg").symlink_to("loop.jpg")
    return [lab.case("37a", "a directory given as a query image", run(query_args(base / "holiday.jpg", lab.index)), REFUSE),
            lab.case("37b", "a symlink loop as a query image", run(query_args(base / "loop.jpg", lab.index)), REFUSE)]


def skipped_list(lab: Lab) -> list[Case]:
    """Case 41: --skip-bad with a broken JPEG, then a rebuild without it: no skipped list may outlive it."""
    base = lab.root / "skip"
    folder = base / "db"
    copy_images(lab.db, folder, 3)
    bad = folder / format_at_name(550000.0, 4180300.0, 10, "S")
    bad.write_bytes(b"not a jpeg")
    out = base / "idx"
    result = run(build_args(folder, out, "--skip-bad"))
    listed = (out / "skipped.txt").is_file()
    cases = [lab.case("41a", "build-index --skip-bad with a broken JPEG", result, WORK, ok=listed, skipped_txt=listed)]
    bad.unlink()
    result = run(build_args(folder, out))
    inside, beside = (out / "skipped.txt").exists(), (base / "idx.skipped.txt").exists()
    cases.append(lab.case("41b", "rebuild after deleting the broken JPEG", result, WORK, ok=not inside and not beside,
                          skipped_txt=inside, stale_out_skipped_txt=beside))
    return cases


# Report.

GROUPS: list[Callable[[Lab], list[Case]]] = [
    interrupt, concurrent_builds, output_paths, training_outputs, wrong_models_and_labels, wrong_ground_truth,
    tiff_scaling, literal_names, bad_image_sets, ground_truth_and_options, outputs_and_indexes, manifests,
    train_resume, odd_query_paths, skipped_list, immutable_index,
]


def base_index(lab: Lab) -> Case:
    """Builds the shared index under umask 022 (case 42: its folder 755, its model.pt 644)."""
    write_places(lab.root / "city", 8, seed=0)
    result = run(build_args(lab.db, lab.index))
    if result.code != 0:
        sys.exit(f"the shared index did not build: {result.stderr.strip()}")
    modes = {"index_dir": f"{lab.index.stat().st_mode & 0o777:o}", "model_pt": f"{(lab.index / 'model.pt').stat().st_mode & 0o777:o}"}
    return lab.case("42", "permissions of a new index under umask 022", result, WORK,
                    ok=modes == {"index_dir": "755", "model_pt": "644"}, **modes)


if __name__ == "__main__":
    main(__doc__, GROUPS, base_index, "hostile_11.json")
