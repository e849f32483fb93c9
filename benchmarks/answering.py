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

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/answering.py --out benchmarks/results/answering.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vpr.data.datasets import load_image_set
from vpr.evaluation.evaluate import query_positives
from vpr.evaluation.localization import error_summary, localization_errors
from vpr.evaluation.recall import recall_at_n
from vpr.fileio import atomic_file
from vpr.models.model import ModelConfig, build_model
from vpr.retrieval.answer import answer
from vpr.retrieval.options import AnswerOptions
from vpr.retrieval.options import Expansion
from vpr.retrieval.options import ExtractOptions
from vpr.retrieval.options import LocalFeatureConfig
from vpr.retrieval.build import build_index, cache_dir_for, describe
from vpr.retrieval.options import RerankOptions
from vpr.retrieval.options import SequenceOptions, speed_range
from vpr.retrieval.store import load_index

NS = (1, 5, 10)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LENGTHS = (1, 5, 10, 20)


@dataclass(frozen=True)
class Dataset:
    """A query set against a database, positives from a ground-truth file or coordinates."""

    name: str
    database: Path
    queries: Path
    gt: Path | None
    ordered: bool  # frames of traversals: sequence matching applies
    descriptors: dict[str, ModelConfig] = field(default_factory=dict)


def thumbnail(height: int, width: int, patch: int) -> ModelConfig:
    """SeqSLAM's front end: a grey patch-normalised thumbnail (no weights)."""
    return ModelConfig(backbone="pixels", head="patchnorm", input_size=(height, width), patch_size=patch)


def random_resnet(height: int, width: int) -> ModelConfig:
    """The demo's model: a seeded random-init ResNet-18 + CosPlace head (no pretrained weights exist here)."""
    return ModelConfig(backbone="resnet18", head="cosplace", descriptor_dim=512, input_size=(height, width))


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


def build(dataset: Dataset, name: str, config: ModelConfig, flavour: str, work: Path, options: ExtractOptions) -> Path:
    """The index of `dataset` for one descriptor and flavour (plain + SIFT, ORB, or with DBA), built once."""
    out = work / f"{dataset.name}-{name.replace(' ', '_')}-{flavour}"
    if out.is_dir():
        return out
    features = {"plain": LocalFeatureConfig("sift"), "orb": LocalFeatureConfig("orb")}.get(flavour)
    dba = Expansion(int(flavour[3:])) if flavour.startswith("dba") else Expansion()
    build_index(load_image_set(dataset.database), out, model=build_model(config, seed=0), options=options,
                cache=cache_dir_for(work / f"{dataset.name}-{name.replace(' ', '_')}"), dba=dba, local_features=features)
    return out


def measure(dataset: Dataset, name: str, config: ModelConfig, work: Path, options: ExtractOptions) -> dict:
    """Every variant on one (set, descriptor): R@N, ms/query, and the localisation error where positions exist."""
    queries = load_image_set(dataset.queries)
    rows: dict = {}
    descriptors: dict[str, np.ndarray] = {}
    for label, (flavour, answering) in variants(dataset).items():
        bundle = load_index(build(dataset, name, config, flavour, work, options))
        positives = query_positives(bundle, queries, gt=dataset.gt, threshold=25.0)
        if "extract_ms" not in rows:
            start = time.perf_counter()
            descriptors["q"] = describe(bundle, queries.paths, options)
            rows["extract_ms"] = round(1000 * (time.perf_counter() - start) / len(queries), 2)
        start = time.perf_counter()
        answers = answer(bundle, descriptors["q"], max(NS), answering, query_paths=queries.paths,
                         query_order=queries.frame_order())
        ms = 1000 * (time.perf_counter() - start) / len(queries)
        labelled = [q for q, p in enumerate(positives) if len(p)]  # Nordland's dark frames have none
        recalls = recall_at_n(answers.indices[labelled], [positives[q] for q in labelled], NS)
        row = {"ms_per_query": round(ms, 2), **{f"R@{n}": round(v, 2) for n, v in recalls.items()}}
        if queries.utm is not None:
            errors = error_summary(localization_errors(answers.estimate.utm, queries.utm))
            row["median_error_m"] = errors["median_m"] and round(errors["median_m"], 1)
            row["within_25m"] = round(errors["within"]["25m"], 1)
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
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/answering.json"), help="JSON report")
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
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(results, indent=1))
    print(markdown(results))


if __name__ == "__main__":
    main(sys.argv[1:])
