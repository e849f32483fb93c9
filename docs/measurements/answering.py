"""Benchmark what comes after the global search: sequence matching, geometric re-ranking, query
expansion / database-side augmentation and the position estimate, on the real sets in
../shared/data/ (Nordland 64x32 summer/winter, VPR-Bench corridor) and the synthetic demo city.

Each (set, descriptor) index is built once (with local features); each answering variant then runs
on the same query descriptors (all queries, in frame order, so sequences stay whole), and recall@N
counts the queries that have a positive (Nordland's 166 dark query frames have none: `vpr eval`
counts them as misses, so its figures there are 3410/3576 of these). "ms/query" is the answering stage alone (search + its extra
work: the query's own local features and K matchings for --rerank local; the sequence search for
--sequence); "extract ms/query" is the forward pass. Writes a JSON report and prints markdown tables;
not a test.

    OMP_NUM_THREADS=2 .venv/bin/python docs/measurements/answering.py --out docs/measurements/results/answering.json

It uses `vpr.api` alone: each variant is `Index.evaluate` on the same query descriptors, its answering time is
the report's `seconds["answer"]`.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vpr import api
from vpr.api import AnswerOptions, BuildOptions, Expansion, ExtractOptions, LocalFeatureConfig, RerankOptions
from vpr.api import SequenceOptions, speed_range

NS = (1, 5, 10)
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
LENGTHS = (1, 5, 10, 20)


@dataclass(frozen=True)
class Dataset:
    """A query set against a database, positives from a ground-truth file or coordinates."""

    name: str
    database: Path
    queries: Path
    gt: Path | None
    ordered: bool  # frames of traversals: sequence matching applies
    descriptors: dict[str, dict] = field(default_factory=dict)  # name -> `api.new_model` arguments


def thumbnail(height: int, width: int, patch: int) -> dict:
    """SeqSLAM's front end: a grey patch-normalised thumbnail (no weights)."""
    return dict(backbone="pixels", head="patchnorm", input_size=(height, width), patch_size=patch)


def random_resnet(height: int, width: int) -> dict:
    """The demo's model: a seeded random-init ResNet-18 + CosPlace head (no pretrained weights exist here)."""
    return dict(backbone="resnet18", head="cosplace", descriptor_dim=512, input_size=(height, width))


def datasets(city: Path) -> list[Dataset]:
    nordland, corridor = SHARED / "nordland_seqslam_64x32", SHARED / "vprbench_corridor"
    return [
        Dataset("nordland", nordland / "summer", nordland / "winter", nordland / "ground_truth.csv", True,
                {"thumbnail 32x64 P8": thumbnail(32, 64, 8), "resnet18 random 64x128": random_resnet(64, 128)}),
        Dataset("corridor", corridor / "ref", corridor / "query", corridor / "ground_truth.csv", True,
                {"thumbnail 30x40 P5": thumbnail(30, 40, 5), "resnet18 random 120x160": random_resnet(120, 160)}),
        Dataset("city", city / "images/test/database", city / "images/test/queries", None, False,
                {"resnet18 random 240x320": random_resnet(240, 320)}),
    ]


def variants(dataset: Dataset) -> dict[str, tuple[str, AnswerOptions]]:
    """Answering variants measured on every index: (index flavour, options)."""
    out = {
        "global": ("plain", AnswerOptions()),
        "qe 1": ("plain", AnswerOptions(qe=Expansion(1))),
        "qe 3": ("plain", AnswerOptions(qe=Expansion(3))),
        "dba 1": ("dba1", AnswerOptions()),
        "dba 3": ("dba3", AnswerOptions()),
        "rerank sift": ("plain", AnswerOptions(rerank=RerankOptions())),
        "rerank orb": ("orb", AnswerOptions(rerank=RerankOptions())),
    }
    if dataset.ordered:
        for length in LENGTHS:  # the defaults: speed 1, no contrast normalisation
            out[f"seq L={length}"] = ("plain", AnswerOptions(sequence=SequenceOptions(length=length)))
        for length in LENGTHS[1:]:
            out[f"seq L={length} window 11"] = ("plain", AnswerOptions(sequence=SequenceOptions(length=length, window=11)))
        out["seq L=10 causal"] = ("plain", AnswerOptions(sequence=SequenceOptions(length=10, causal=True)))
        out["seq L=10 speeds 0.8-1.25 x5"] = ("plain", AnswerOptions(sequence=SequenceOptions(length=10, speeds=speed_range(0.8, 1.25, 5))))
    return out


def build(dataset: Dataset, name: str, config: dict, flavour: str, work: Path, options: ExtractOptions) -> Path:
    """The index of `dataset` for one descriptor and flavour (plain + SIFT, ORB, or with DBA), built once."""
    out = work / f"{dataset.name}-{name.replace(' ', '_')}-{flavour}"
    if out.is_dir():
        return out
    features = {"plain": LocalFeatureConfig("sift"), "orb": LocalFeatureConfig("orb")}.get(flavour)
    dba = Expansion(int(flavour[3:])) if flavour.startswith("dba") else Expansion()
    model, _ = api.new_model(seed=0, **config)
    api.build_index(dataset.database, out, model=model, options=BuildOptions(extract=options, dba=dba, local_features=features))
    return out


def measure(dataset: Dataset, name: str, config: dict, work: Path, options: ExtractOptions) -> dict:
    """Every variant on one (set, descriptor): R@N, ms/query, and the localisation error where positions exist."""
    queries = api.images(dataset.queries)
    rows: dict = {}
    descriptors = None
    for label, (flavour, answering) in variants(dataset).items():
        index = api.Index.load(build(dataset, name, config, flavour, work, options), device="cpu",
                               batch_size=options.batch_size, options=answering)
        report = index.evaluate(queries, ns=NS, gt=dataset.gt, descriptors=descriptors)
        if descriptors is None:  # every variant answers the same query descriptors
            descriptors = report.descriptors
            rows["extract_ms"] = round(1000 * report.seconds["describe"] / len(queries), 2)
        ms = 1000 * report.seconds["answer"] / len(queries)
        labelled = [q for q, p in enumerate(report.positives) if len(p)]  # Nordland's dark frames have none
        recalls = api.recall_at_n(report.predictions[labelled], [report.positives[q] for q in labelled], NS)
        row = {"ms_per_query": round(ms, 2), **{f"R@{n}": round(v, 2) for n, v in recalls.items()}}
        if report.localization is not None:
            row["median_error_m"] = report.localization["median_m"] and round(report.localization["median_m"], 1)
            row["within_25m"] = round(report.localization["within"]["25m"], 1)
        rows[label] = row
        logging.info("%s / %s / %s: %s", dataset.name, name, label, row)
    return rows


def markdown(results: dict) -> str:
    """One table per set: a row per (descriptor, variant)."""
    lines = []
    for set_name, by_descriptor in results["sets"].items():
        with_position = any("median_error_m" in row for rows in by_descriptor.values() for row in rows.values() if isinstance(row, dict))
        header = "| descriptor | answering | R@1 | R@5 | R@10 | ms/query |" + (" median error m | within 25 m % |" if with_position else "")
        lines += [f"\n{set_name}", "", header, "|" + "---|" * (header.count("|") - 1)]
        for descriptor, rows in by_descriptor.items():
            for label, row in rows.items():
                if not isinstance(row, dict):
                    continue
                cells = [descriptor, label, row["R@1"], row["R@5"], row["R@10"], row["ms_per_query"]]
                if with_position:
                    cells += [row.get("median_error_m"), row.get("within_25m")]
                lines.append("| " + " | ".join(str(c) for c in cells) + " |")
            lines.append(f"| {descriptor} | (extraction) | | | | {rows['extract_ms']} |" + (" | |" if with_position else ""))
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--city", type=Path, default=Path("data/demo-city-small"), help="synthetic city (`make demo` renders it)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vpr-answering-bench"), help="scratch folder for the indexes")
    parser.add_argument("--out", type=Path, default=Path("docs/measurements/results/answering.json"), help="JSON report")
    parser.add_argument("--sets", default="nordland,corridor,city", help="comma-separated subset of the sets")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    options = ExtractOptions(batch_size=32, num_workers=0)
    chosen = set(args.sets.split(","))
    results: dict = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "sets": {}}
    for dataset in datasets(args.city):
        if dataset.name not in chosen or not dataset.database.is_dir():
            continue
        results["sets"][dataset.name] = {name: measure(dataset, name, config, args.work, options)
                                         for name, config in dataset.descriptors.items()}
    api.write_json(args.out, results)
    print(markdown(results))


if __name__ == "__main__":
    main(sys.argv[1:])
