"""`vpr bench` (vpr/bench): its JSON on tiny sizes, its settings, its data, and that it searches with `vpr query`'s code.

Speed figures depend on the machine and are not checked; what the JSON holds, the counts, the
descriptors' agreement and the search results are.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli.app import main
from conftest import write_places
from vpr.bench import BACKEND_VARIANTS as BENCH_BACKENDS
from vpr.bench.config import BenchConfig, bench_config
from vpr.bench.data import city_images, replicate
from vpr.bench.reference import topk_agreement
from vpr.bench.run import run_bench
from vpr.bench.search import query_search, searchers
from vpr.data.datasets import GeoImageSet
from vpr.errors import UsageError
from vpr.models.model import ModelConfig, build_model
from vpr.retrieval.store import load_index, write_index

SIZE = (48, 64)
VPR = Path(sys.executable).with_name("vpr")
SEARCH_KEYS = {"size", "kind", "queries", "p50_ms", "p95_ms", "queries_per_s", "batch_peak_mb", "recall1_vs_exact",
               "recall1_at10_vs_exact"}
PIPELINE_KEYS = {"images_per_s", "steady_images_per_s", "seconds", "rss_peak_mb", "gpu_peak_mb", "main_cpu_ms_per_image",
                 "workers_cpu_ms_per_image"}


def rss_mb() -> float:
    """This process's resident memory now, in MB (Linux)."""
    return int(re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1)) * 1024 / 1e6


@pytest.mark.slow
def test_bench_runs_end_to_end_on_tiny_sizes(tmp_path):
    write_places(tmp_path / "city" / "images" / "test", 12, seed=3)
    config = BenchConfig(
        data=tmp_path / "city", model=ModelConfig(descriptor_dim=32, input_size=SIZE), batch_size=8, workers=0,
        extract_images=16, jpeg_size=(60, 80), forward_batches=1, index_sizes=(600,), pca_dim=16,
        num_queries=20, latency_queries=8, memory_images=(16,),
    )
    stages = []
    results = run_bench(config, stages.append)
    assert list(results) == ["written_by", "created", "machine", "versions", "settings", "data", "extraction", "index",
                             "search", "query_latency", "build_index_memory", "memory", "seconds"]
    assert results["written_by"] == "vpr bench" and results["settings"]["data"] == str(tmp_path / "city")
    assert results["settings"]["index_sizes"] == (600,) and results["machine"]["device"] == "cpu"
    assert results["data"] == {"root": str(tmp_path / "city"), "database": 12, "queries": 12, "preset": None,
                               "image_size": [48, 64]}

    extraction = results["extraction"]
    assert (extraction["images"], extraction["batch_size"], extraction["workers"]) == (16, 8, 0)
    assert set(extraction["forward_only_images_per_s"]) == {"plain_fp32", "fast_fp32", "fast_amp"}
    assert set(extraction["pipeline"]) == {"fp32", "amp"}
    assert all(set(row) == PIPELINE_KEYS for row in extraction["pipeline"].values())
    fp32, amp = extraction["agreement_with_reference"]["fp32"], extraction["agreement_with_reference"]["amp"]
    assert fp32["max_abs_diff"] < 1e-5 and fp32["top5_similarity_max_diff"] <= 1e-5
    assert amp["max_abs_diff"] < 2e-2 and amp["top5_similarity_max_diff"] <= 2.0 ** -8  # not top5_identical: ties
    reference = extraction["reference"]["images_per_s"]
    for name, row in extraction["pipeline"].items():  # the figures a reader divides agree, up to their 2-decimal rounding
        rate, seconds = row["images_per_s"], row["seconds"]
        assert abs(rate * seconds - 16) <= 0.005 * (rate + seconds) + 1e-4
        ratio = rate / reference
        assert abs(extraction["speedup_vs_reference"][name] - ratio) <= 0.005 + ratio * (0.005 / rate + 0.005 / reference) + 1e-6

    # 600 descriptors: too few for IVF-PQ (it needs 39 x 256 training points), so flat, hnsw and torch
    assert [(r["size"], r["kind"]) for r in results["index"]] == [(600, "pca"), (600, "flat"), (600, "hnsw"), (600, "torch")]
    assert all(r["dim"] == 16 for r in results["index"][1:]) and results["index"][1]["index_mb"] == 0.0
    assert [(r["size"], r["kind"], r["queries"]) for r in results["search"]] == [
        (600, "flat", 20), (600, "hnsw", 20), (600, "torch", 20)]
    by_kind = {r["kind"]: r for r in results["search"]}
    assert set(by_kind["flat"]) == set(by_kind["hnsw"]) == SEARCH_KEYS and set(by_kind["torch"]) == SEARCH_KEYS | {"full_matrix_mb"}
    for row in results["search"]:
        assert 0 <= row["p50_ms"] <= row["p95_ms"] and row["recall1_vs_exact"] <= row["recall1_at10_vs_exact"]
    assert by_kind["flat"]["recall1_vs_exact"] == by_kind["flat"]["recall1_at10_vs_exact"] == 1.0  # the exact reference itself
    # torch vs flat: two exact searches, but another kernel may swap a near-tied top-1, so not recall@1;
    # the exact top-1 falls out of torch's top-10 only if ten rows tie with it
    assert by_kind["torch"]["recall1_at10_vs_exact"] == 1.0

    latency = results["query_latency"]
    assert (latency["database_size"], latency["queries"], latency["autocast"]) == (600, 10, None)
    assert list(latency["kinds"]) == ["flat", "hnsw", "torch"]
    for row in latency["kinds"].values():
        assert 0 <= row["total_p50_ms"] <= row["total_p95_ms"] and row["search_p50_ms"] <= row["total_p50_ms"]
    memory = results["build_index_memory"]
    assert memory["descriptor_bytes_per_image"] == 32 * 4 and memory["peak_bytes_per_extra_image"] is None  # one size
    (row,) = memory["rows"]
    assert row["images"] == 16 and "error" not in row and row["seconds"] > 0, row
    # a peak is at least what is held at the end (not at the start: the kernel's peak counter restarts at each
    # measured block, and memory held at the start may be freed meanwhile)
    assert results["memory"]["gpu_peak_mb"] is None and results["memory"]["peak_rss_mb"] >= rss_mb() - 1.0
    assert stages[:2] == ["writing 16 photo-size JPEGs", "forward only: plain_fp32"]
    assert "600 descriptors: searching flat" in stages and stages[-1] == "build-index memory: 16 images (fresh process)"


@pytest.mark.parametrize("args,message", [(["--images", "1"], "--images"), (["--sizes", "50"], "--sizes 50"),
                                          (["--device", "tpu"], "--device tpu"), (["--cases", "speed"], "--cases speed"),
                                          (["--head", "nohead"], "unknown head 'nohead'"),
                                          (["--model", "resnet18", "--checkpoint", "x.pt"], "drop them with --checkpoint"),
                                          (["--backend", "tflite_fp32"], "--backend tflite_fp32")])
def test_bench_rejects_bad_settings_with_a_usage_error(monkeypatch, capsys, tmp_path, args, message):
    monkeypatch.setattr(sys, "argv", ["vpr", "bench", "--quick", "--out", str(tmp_path / "b.json"), *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


@pytest.mark.slow
def test_the_backends_case_measures_every_variant_beside_a_plain_onnx_runtime_session(tmp_path):
    # in a subprocess: ONNX Runtime's and OpenVINO's thread pools left in the test process crash later forks
    write_places(tmp_path / "city" / "images" / "test", 12, seed=3)
    out = tmp_path / "bench.json"
    result = subprocess.run([str(VPR), "bench", "--quick", "--data", str(tmp_path / "city"), "--cases", "none",
                             "--backend", "all", "--resize", "48x64", "--batch-size", "4", "--workers", "0",
                             "--images", "8", "--jpeg-size", "60x80", "--out", str(out)],
                            capture_output=True, timeout=900)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    results = json.loads(out.read_text())["backends"]
    assert set(results["forward_only_images_per_s"]) == {"plain_onnxruntime_fp32", *BENCH_BACKENDS}
    assert set(results["pipeline"]) == set(results["single_image_latency_ms"]) == set(BENCH_BACKENDS)
    assert all(rate > 0 for rate in results["forward_only_images_per_s"].values())
    fp32 = {name: results["agreement"][name]["min_cosine_to_torch_fp32"] for name in BENCH_BACKENDS if name.endswith("fp32") and name != "torch_fp32"}
    assert all(cosine > 0.9999 for cosine in fp32.values()), fp32
    assert all(results["agreement"][name]["min_cosine_to_torch_fp32"] > 0.95 for name in BENCH_BACKENDS if name != "torch_fp32")


def test_cases_select_what_runs():
    from cli.bench_cmd import parse_cases

    assert parse_cases("all") == ("extraction", "search", "memory")
    assert parse_cases("extraction, memory") == ("extraction", "memory")


def test_presets_and_overrides():
    quick = bench_config(quick=True)
    assert (quick.preset, quick.extract_images, quick.index_sizes, quick.num_queries) == ("tiny", 192, (10_000, 100_000), 200)
    full = bench_config(batch_size=None, workers=3)  # None keeps the default
    assert (full.preset, full.batch_size, full.workers, full.index_sizes) == ("small", 32, 3, (10_000, 100_000, 1_000_000))
    assert not full.compile and bench_config(device="cuda:0").batch_size == 128
    with pytest.raises(UsageError, match="workers -1"):
        bench_config(workers=-1)


@pytest.mark.parametrize("layout", ["images/SPLIT", "SPLIT"])
def test_city_images_takes_every_split_in_either_dataset_layout(tmp_path, layout):
    for split, count in (("train", 3), ("test", 5)):
        write_places(tmp_path / layout.replace("SPLIT", split), count, seed=count)
    database, queries, info = city_images(BenchConfig(data=tmp_path), tmp_path / "work", lambda message: None)
    assert (len(database), len(queries)) == (8, 8)
    assert [p.parent.parent.name for p in database] == ["train"] * 3 + ["test"] * 5
    assert {p.parent.name for p in queries} == {"queries"}
    assert info == {"root": str(tmp_path), "database": 8, "queries": 8, "preset": None, "image_size": [48, 64]}
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="give a `vpr synth` folder as data"):
        city_images(BenchConfig(data=tmp_path / "empty"), tmp_path / "work", lambda message: None)


def test_replicated_descriptors_are_unit_deterministic_and_near_the_real_ones():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(50, 32)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    grown = replicate(base, 70_000, np.random.default_rng(0))  # more than one 65,536-row chunk
    assert grown.shape == (70_000, 32) and grown.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(grown, axis=1), 1.0, rtol=0, atol=1e-5)
    assert np.array_equal(grown[:65536], replicate(base, 65536, np.random.default_rng(0)))  # chunk by chunk, seeded
    assert not np.array_equal(grown[:10], replicate(base, 10, np.random.default_rng(1)))
    # a real row a moved at most half way to another row b, plus 10% noise: cosine to a at least ~sqrt((1 + a.b) / 2)
    nearest = (grown @ base.T).max(axis=1)
    assert np.median(nearest) > 0.9 and nearest.min() > 0.4  # seeded: 0.946 and 0.477 here


def test_topk_agreement_counts_the_queries_whose_top_k_changed():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(20, 8)).astype(np.float32)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    assert topk_agreement(reference, reference.copy()) == {"identical": 1.0, "similarity_max_diff": 0.0}
    candidate = reference.copy()
    candidate[13] = -reference[13]  # query 3 of 10: its top-5 becomes its bottom-5 of the 10 database rows
    agreement = topk_agreement(reference, candidate, 5)
    sims = reference[:10] @ reference[13]
    assert agreement["identical"] == 0.9
    np.testing.assert_allclose(agreement["similarity_max_diff"], np.max(np.sort(sims)[::-1][:5] + np.sort(sims)[:5]), atol=1e-6)
    assert topk_agreement(reference[:1], candidate[:1]) == {"identical": 1.0, "similarity_max_diff": 0.0}


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    """A small index of each kind over the same 2,000 descriptors, and 50 queries."""
    rng = np.random.default_rng(2)
    db = rng.normal(size=(2000, 32)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    queries = db[:50] + 0.05 * rng.normal(size=(50, 32)).astype(np.float32)
    model = build_model(ModelConfig(descriptor_dim=32, input_size=SIZE), seed=0)
    folder = tmp_path_factory.mktemp("bench-indexes")
    paths = [folder / f"{i}.jpg" for i in range(len(db))]
    for kind in ("flat", "ivfpq", "hnsw"):
        write_index(folder / kind, model=model, model_pca=None, pca=None, kind=kind, source="test",
                    database=GeoImageSet(paths=paths, utm=None, heading=None), descriptors=db)
    return folder, db, queries


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
def test_bench_searches_an_index_with_the_code_vpr_query_runs(indexes, kind):
    folder, db, queries = indexes
    bundle = load_index(folder / kind)
    expected = bundle.search(queries, 10)
    got = query_search(kind, bundle.descriptors, bundle.faiss_index)(queries, 10)
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])


def test_bench_search_cases_are_the_index_kinds_then_exact_torch_search(indexes):
    _, db, queries = indexes
    config = BenchConfig(seed=0)
    built = list(searchers(db, config, torch.device("cpu"), lambda message: None, len(db)))
    assert [kind for kind, _, _ in built] == ["flat", "hnsw", "torch"]  # 2,000 rows: too few for IVF-PQ
    flat, torch_rows = built[0][2](queries, 10), built[2][2](queries, 10)
    assert np.array_equal(flat[1], load_index(indexes[0] / "flat").search(queries, 10)[1])
    assert built[2][1]["index_mb"] == round(2000 * 32 * 4 / 1e6, 1) and torch_rows[1].shape == (50, 10)
    np.testing.assert_allclose(torch_rows[0], flat[0], rtol=0, atol=1e-5)
