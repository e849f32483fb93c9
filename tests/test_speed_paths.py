"""Every optimised path gives the plain path's results: same descriptors (within fp16/bf16 tolerance
for autocast) and the same top-k, and the benchmark runs end to end on tiny sizes."""

import copy
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cli.app import main
from conftest import place_image, write_places
from vpr.errors import ImageError
from vpr.evaluation.bench import BenchConfig, reference_extract, replicate, run_bench, topk_agreement
from vpr.models.model import ModelConfig, build_model
from vpr.retrieval.extract import embed_batch, extract_descriptors, inference_model
from vpr.data.datasets import GeoImageSet
from vpr.retrieval.index import (
    build_faiss_index, exact_search, faiss_search, index_to_device, rerank, search_database, torch_search,
)
from vpr.retrieval.store import load_index, write_index

SIZE = (48, 64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: the machine's cores are shared, and tiny ops only wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """24 distinct places as JPEGs of mixed sizes (larger than, equal to and smaller than the input)."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(24):
        size = ((96, 128), SIZE, (40, 52))[i % 3]
        path = folder / f"{i:02d}.jpg"
        Image.fromarray(place_image(rng, size)).save(path, quality=95)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def model():
    """A tiny model whose BatchNorms have non-trivial statistics, so folding them is really tested."""
    net = build_model(ModelConfig(descriptor_dim=64, input_size=SIZE), seed=0)
    gen = torch.Generator().manual_seed(0)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=gen) - 0.5)
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
            module.bias.data.copy_(torch.rand(module.num_features, generator=gen) - 0.5)
    return net


def topk(database, queries, k=5):
    return torch_search(database, queries, k)[1]


def test_optimised_extraction_equals_the_plain_reference_loop(model, photos):
    reference = reference_extract(model, photos, batch_size=5)
    fast = extract_descriptors(model, photos, batch_size=8, num_workers=1).descriptors
    np.testing.assert_allclose(fast, reference, atol=1e-5)
    assert np.array_equal(topk(fast[:12], fast[12:]), topk(reference[:12], reference[12:]))
    assert topk_agreement(reference, fast)["identical"] == 1.0


def test_bf16_autocast_stays_within_bf16_tolerance(model, photos):
    fp32 = extract_descriptors(model, photos, num_workers=0).descriptors
    bf16 = extract_descriptors(model, photos, num_workers=0, amp=True).descriptors
    assert np.abs(bf16 - fp32).max() < 2e-2
    assert np.array_equal(topk(bf16[:12], bf16[12:], 1), topk(fp32[:12], fp32[12:], 1))


def test_decoding_on_the_device_matches_pil_decoding(model, photos, tmp_path):
    png = tmp_path / "place.png"  # not a JPEG: decoded by PIL in the worker
    Image.open(photos[0]).save(png)
    grey = tmp_path / "grey.jpg"
    Image.open(photos[1]).convert("L").save(grey, quality=95)
    rotated = tmp_path / "rotated.jpg"  # EXIF orientation: PIL turns it upright
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 3
    Image.open(photos[2]).rotate(180).save(rotated, quality=95, exif=exif.tobytes())
    paths = [*photos, png, grey, rotated]
    pil = extract_descriptors(model, paths, batch_size=8, num_workers=0).descriptors
    device = extract_descriptors(model, paths, batch_size=8, num_workers=2, decode_on_device=True).descriptors
    assert np.abs(device - pil).max() < 2e-2  # torch's antialiased bilinear resize vs PIL's
    assert np.array_equal(topk(device[:12], device[12:], 1), topk(pil[:12], pil[12:], 1))
    assert np.abs(device[24:] - pil[24:]).max() < 2e-2


def test_device_decoding_reports_bad_files_like_pil(model, photos, tmp_path):
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(photos[0].read_bytes()[:300])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageError, match="cut.jpg"):
        extract_descriptors(model, [photos[0], truncated], num_workers=0, decode_on_device=True)
    result = extract_descriptors(model, [photos[0], truncated, garbage, photos[1]], num_workers=0,
                                 decode_on_device=True, skip_bad=True)
    assert result.kept.tolist() == [0, 3] and [p for p, _ in result.skipped] == [truncated, garbage]


def test_inference_copy_folds_batchnorm_and_leaves_the_model_alone(model):
    model.train()
    before = copy.deepcopy(model.state_dict())
    fast = inference_model(model, torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    batch = torch.randint(0, 256, (4, 3, *SIZE), dtype=torch.uint8)
    np.testing.assert_allclose(embed_batch(fast, batch, "cpu"), embed_batch(model, batch, "cpu"), atol=1e-5)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile needs a C++ compiler on the CPU")
def test_compiled_extraction_gives_the_plain_descriptors_with_a_short_last_batch(model, photos):
    plain = extract_descriptors(model, photos, batch_size=10, num_workers=0).descriptors
    compiled = extract_descriptors(model, photos, batch_size=10, num_workers=0, compile=True).descriptors
    assert compiled.shape == plain.shape == (24, 64)  # batches of 10, 10 and 4 (padded to 10)
    assert np.abs(compiled - plain).max() < 1e-4
    assert np.array_equal(topk(plain[:12], plain[12:]), topk(compiled[:12], compiled[12:]))


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(1)
    db = rng.normal(size=(3000, 32)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    queries = db[rng.integers(0, 3000, 70)] + 0.1 * rng.normal(size=(70, 32)).astype(np.float32)
    return db, queries


def test_torch_search_equals_faiss_flat_search(vectors):
    db, queries = vectors
    faiss_sim, faiss_idx = faiss_search(build_faiss_index(db, "flat"), queries, 10)
    torch_sim, torch_idx = torch_search(db, queries, 10)
    assert np.array_equal(torch_idx, faiss_idx)
    np.testing.assert_allclose(torch_sim, faiss_sim, atol=1e-5)


@pytest.mark.parametrize("chunk,query_chunk", [(128, 16), (1000, 1), (2999, 64), (7, 70)])
def test_chunked_search_equals_unchunked_search(vectors, chunk, query_chunk):
    db, queries = vectors[0][:300], vectors[1][:20] if query_chunk == 1 else vectors[1]
    whole_sim, whole_idx = torch_search(db, queries, 10, chunk=len(db), query_chunk=len(queries))
    sim, idx = torch_search(db, queries, 10, chunk=chunk, query_chunk=query_chunk)
    assert np.array_equal(idx, whole_idx) and np.allclose(sim, whole_sim, atol=1e-6)


def test_fp16_search_of_the_gpu_path_keeps_the_fp32_top_1(vectors):
    db, queries = vectors
    sim, idx = torch_search(db, queries, 5)
    half_sim, half_idx = torch_search(search_database(db, "cpu", half=True), queries, 5, half=True)
    assert np.array_equal(half_idx[:, 0], idx[:, 0]) and np.abs(half_sim - sim).max() < 2e-3


def test_search_edge_cases_and_resident_database(vectors):
    db, queries = vectors
    sim, idx = torch_search(db[:4], queries, 10, chunk=3)
    assert idx.shape == (70, 4) and np.all(np.diff(sim, axis=1) <= 0)
    assert torch_search(db, queries[:0], 5)[1].shape == (0, 5)
    resident = search_database(db)
    assert np.array_equal(torch_search(resident, queries, 5)[1], torch_search(db, queries, 5)[1])


def test_exact_search_on_the_array_equals_a_flat_faiss_index(vectors):
    db, queries = vectors
    sim, idx = exact_search(db, queries, 10)
    flat_sim, flat_idx = faiss_search(build_faiss_index(db, "flat"), queries, 10)
    assert np.array_equal(idx, flat_idx) and np.allclose(sim, flat_sim, atol=1e-6)


def test_rerank_orders_candidates_by_exact_similarity(vectors):
    db, queries = vectors
    exact_sim, exact_idx = torch_search(db, queries, 5)
    rng = np.random.default_rng(0)
    others = np.stack([rng.choice(np.setdiff1d(np.arange(len(db)), row), 20, replace=False) for row in exact_idx])
    candidates = rng.permuted(np.concatenate([exact_idx, others, np.full((len(queries), 3), -1)], axis=1), axis=1)
    sim, idx = rerank(db, queries, candidates, 5, query_chunk=16)
    assert np.array_equal(idx, exact_idx) and np.allclose(sim, exact_sim, atol=1e-5)
    sim, idx = rerank(db, queries[:1], np.array([[7, -1, -1]]), 3)
    assert idx.tolist() == [[7, -1, -1]] and np.isinf(sim[0, 1:]).all()


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
def test_every_index_kind_returns_the_exact_top_k_on_real_descriptors(model, photos, tmp_path, kind):
    """Descriptors of real images grown to 12k by the benchmark's perturbation (500 near-copies of each
    image: a hard case): flat is exact, the approximate kinds find the exact nearest neighbour for
    nearly every query, and re-ranking lifts IVF-PQ far above its compressed-distance order."""
    base = extract_descriptors(model, photos, num_workers=0).descriptors
    rng = np.random.default_rng(0)
    db = replicate(base, 12000, rng)
    queries = replicate(base, 200, rng)
    paths = [tmp_path / f"{i}.jpg" for i in range(len(db))]
    write_index(tmp_path / "idx", model=model, model_pca=None, pca=None, kind=kind, source="test",
                database=GeoImageSet(paths=paths, utm=None, heading=None), descriptors=db)
    bundle = load_index(tmp_path / "idx")
    assert (bundle.directory / "index.faiss").exists() == (kind != "flat")
    sim, idx = bundle.search(queries, 5)
    exact_sim, exact_idx = torch_search(db, queries, 5)
    same = np.abs(sim - exact_sim) < 1e-5  # the same neighbours, up to ties between float summation orders
    assert np.all(np.diff(sim, axis=1) <= 1e-6)
    if kind == "flat":
        assert same.all()
        return
    assert np.mean(same[:, 0]) >= 0.9
    if kind == "ivfpq":
        raw_top1 = np.mean(faiss_search(bundle.faiss_index, queries, 1)[1][:, 0] == exact_idx[:, 0])
        assert np.mean(idx[:, 0] == exact_idx[:, 0]) >= raw_top1 + 0.3, raw_top1
    default = np.mean(idx[:, 0] == exact_idx[:, 0])
    bundle.set_search_params(**({"nprobe": 1} if kind == "ivfpq" else {"ef_search": 1}))
    assert np.mean(bundle.search(queries, 5)[1][:, 0] == exact_idx[:, 0]) < default  # fewer lists / candidates
    if kind == "hnsw":
        bundle.set_search_params(ef_search=1024)
        assert np.mean(bundle.search(queries, 5)[1][:, 0] == exact_idx[:, 0]) >= default


def test_faiss_indexes_stay_on_the_cpu_without_a_faiss_gpu(vectors):
    index = build_faiss_index(vectors[0], "flat")
    assert index_to_device(index, "cpu") is index
    if not torch.cuda.is_available():
        assert index_to_device(index, "cuda") is index


def test_replicated_descriptors_are_unit_and_near_the_real_ones(vectors):
    base = vectors[0][:50]
    grown = replicate(base, 1000, np.random.default_rng(0))
    assert grown.shape == (1000, 32) and np.allclose(np.linalg.norm(grown, axis=1), 1.0, atol=1e-5)
    assert np.median((grown @ base.T).max(axis=1)) > 0.7  # each one lies near a real descriptor


def test_bench_runs_end_to_end_on_tiny_sizes(tmp_path):
    for split in ("test",):
        write_places(tmp_path / "city" / "images" / split, 12, seed=3)
    config = BenchConfig(
        data=tmp_path / "city", model=ModelConfig(descriptor_dim=32, input_size=SIZE), batch_size=8, workers=0,
        extract_images=16, jpeg_size=(60, 80), forward_batches=1, index_sizes=(600,), pca_dim=16,
        num_queries=20, latency_queries=8, memory_images=(16,),
    )
    stages = []
    results = run_bench(config, stages.append)
    extraction = results["extraction"]
    assert extraction["agreement_with_reference"]["fp32"]["max_abs_diff"] < 1e-5
    assert set(extraction["pipeline"]) == {"fp32", "amp"} and extraction["speedup_vs_reference"]["fp32"] > 0
    kinds = {(r["size"], r["kind"]) for r in results["search"]}
    assert {(600, "flat"), (600, "hnsw"), (600, "torch")} <= kinds
    flat = [r for r in results["search"] if r["kind"] in ("flat", "torch")]
    assert all(r["recall1_vs_exact"] == 1.0 for r in flat)
    assert set(results["query_latency"]["kinds"]) >= {"flat", "torch"}
    (memory,) = results["build_index_memory"]["rows"]
    assert memory["images"] == 16 and "error" not in memory and memory["seconds"] > 0
    assert results["memory"]["peak_rss_mb"] > 0 and stages


@pytest.mark.parametrize("args,message", [(["--images", "1"], "--images 1"), (["--sizes", "50"], "--sizes 50"),
                                          (["--device", "tpu"], "--device tpu")])
def test_bench_rejects_bad_settings_with_a_usage_error(monkeypatch, capsys, tmp_path, args, message):
    monkeypatch.setattr(sys, "argv", ["vpr", "bench", "--quick", "--out", str(tmp_path / "b.json"), *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()
