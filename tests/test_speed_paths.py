"""Every optimised path gives the plain path's results: same descriptors (within fp16/bf16 tolerance
for autocast) and the same top-k. (The benchmark itself is tested in tests/test_bench.py.)

"The same top-k" is checked tie-aware (tests/helpers_search.py): by the similarities of the rows
returned, never by comparing indices, since kernels that sum in another order (AVX-512 FAISS,
another BLAS) may break near-ties differently. Search-quality figures (recall, the lift re-ranking
gives) depend on the data and the kernel and belong to `vpr bench`; tests check what holds by
construction.
"""

import copy
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import place_image
from helpers_extract import near_copies, plain_extract
from helpers_search import TOL, assert_exact_top_k, assert_same_retrieval, assert_valid_result, true_similarities
from vpr.errors import ImageError
from vpr.models.model import ModelConfig, build_model
from vpr.models.inference import forward_batch, inference_model
from vpr.retrieval.extract import extract_descriptors
from vpr.retrieval.options import ExtractOptions
from vpr.data.datasets import GeoImageSet
from vpr.retrieval.search import (
    build_faiss_index, exact_search, faiss_search, index_to_device, require_faiss, refine, search_database, shortlist,
    torch_search,
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


def same_retrieval(reference, candidate, k=5, *, tol):
    """Rows 12: searched against rows :12 retrieve alike (similarities within `tol`; see helpers_search).
    These tiny random-init descriptors are nearly parallel (similarities within 0.011 of each other,
    neighbours 1e-6 apart): which of two near-tied rows comes first is the kernel's choice."""
    assert_same_retrieval(reference, candidate, 12, k, torch_search, tol=tol)


def test_optimised_extraction_equals_the_plain_reference_loop(model, photos):
    reference = plain_extract(model, photos, batch_size=5)
    fast = extract_descriptors(model, photos, ExtractOptions(batch_size=8, num_workers=1)).descriptors
    assert fast.shape == reference.shape == (24, 64) and fast.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(fast, reference, atol=1e-5)
    same_retrieval(reference, fast, tol=1e-5)


def test_bf16_autocast_stays_within_bf16_tolerance(model, photos):
    fp32 = extract_descriptors(model, photos, ExtractOptions(num_workers=0)).descriptors
    bf16 = extract_descriptors(model, photos, ExtractOptions(num_workers=0, amp=True)).descriptors
    assert np.abs(bf16 - fp32).max() < 2e-2
    same_retrieval(fp32, bf16, 1, tol=2.0 ** -8)  # one bf16 rounding of a similarity near 1


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
    pil = extract_descriptors(model, paths, ExtractOptions(batch_size=8, num_workers=0)).descriptors
    device = extract_descriptors(model, paths, ExtractOptions(batch_size=8, num_workers=2, decode_on_device=True)).descriptors
    assert np.abs(device - pil).max() < 2e-2  # torch's antialiased bilinear resize vs PIL's
    same_retrieval(pil, device, 1, tol=1e-3)
    assert np.abs(device[24:] - pil[24:]).max() < 2e-2


def test_device_decoding_reports_bad_files_like_pil(model, photos, tmp_path):
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(photos[0].read_bytes()[:300])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageError, match="cut.jpg"):
        extract_descriptors(model, [photos[0], truncated], ExtractOptions(num_workers=0, decode_on_device=True))
    result = extract_descriptors(model, [photos[0], truncated, garbage, photos[1]],
                                 ExtractOptions(num_workers=0, decode_on_device=True, skip_bad=True))
    assert result.kept.tolist() == [0, 3] and [p for p, _ in result.skipped] == [truncated, garbage]


def test_inference_copy_folds_batchnorm_and_leaves_the_model_alone(model):
    model.train()
    before = copy.deepcopy(model.state_dict())
    fast = inference_model(model, torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    batch = torch.randint(0, 256, (4, 3, *SIZE), dtype=torch.uint8)
    np.testing.assert_allclose(forward_batch(fast, batch), forward_batch(model, batch), atol=1e-5)


def test_inference_copy_of_a_model_without_batchnorm_shares_its_weights_and_leaves_it_alone():
    """No weight changes for a ViT on its own device: no second copy of the (gigabytes of) weights."""
    from vpr.models.model import ModelConfig, build_model

    config = ModelConfig(backbone="dinov2_vits14", backbone_options={"blocks": 1}, head="salad",
                         head_options={"num_clusters": 4, "cluster_dim": 8, "token_dim": 8, "mlp_dim": 16},
                         input_size=(56, 56), multiple=14, resampler="torch")
    model = build_model(config, seed=0).train()
    before = copy.deepcopy(model.state_dict())
    fast = inference_model(model, torch.device("cpu"))
    assert fast.backbone.blocks[0].attn.qkv.weight is model.backbone.blocks[0].attn.qkv.weight
    assert fast.backbone.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.training and not fast.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.backbone.patch_embed.proj.weight.is_contiguous()  # the caller's layout is unchanged
    batch = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8)
    np.testing.assert_allclose(forward_batch(fast, batch), forward_batch(model.eval(), batch), atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile needs a C++ compiler on the CPU")
def test_compiled_extraction_gives_the_plain_descriptors_with_a_short_last_batch(model, photos):
    plain = extract_descriptors(model, photos, ExtractOptions(batch_size=10, num_workers=0)).descriptors
    compiled = extract_descriptors(model, photos, ExtractOptions(batch_size=10, num_workers=0, compile=True)).descriptors
    assert compiled.shape == plain.shape == (24, 64)  # batches of 10, 10 and 4 (padded to 10)
    assert np.abs(compiled - plain).max() < 1e-4
    same_retrieval(plain, compiled, tol=1e-4)


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
    assert_exact_top_k(db, queries, faiss_sim, faiss_idx, 10)
    assert_exact_top_k(db, queries, torch_sim, torch_idx, 10)
    np.testing.assert_allclose(torch_sim, faiss_sim, rtol=0, atol=TOL)


@pytest.mark.parametrize("chunk,query_chunk", [(128, 16), (1000, 1), (2999, 64), (7, 70)])
def test_chunked_search_equals_unchunked_search(vectors, chunk, query_chunk):
    db, queries = vectors[0][:300], vectors[1][:20] if query_chunk == 1 else vectors[1]
    whole_sim, whole_idx = torch_search(db, queries, 10, chunk=len(db), query_chunk=len(queries))
    sim, idx = torch_search(db, queries, 10, chunk=chunk, query_chunk=query_chunk)
    assert_exact_top_k(db, queries, sim, idx, 10)
    np.testing.assert_allclose(sim, whole_sim, rtol=0, atol=TOL)  # a 1-row product may be a gemv: other rounding


def test_fp16_search_of_the_gpu_path_keeps_the_fp32_top_k(vectors):
    db, queries = vectors
    sim, idx = torch_search(db, queries, 5)
    half_sim, half_idx = torch_search(search_database(db, "cpu", half=True), queries, 5, half=True)
    assert np.abs(half_sim - sim).max() < 2e-3
    assert_exact_top_k(db, queries, half_sim, half_idx, 5, tol=2e-3)  # the fp32 top-k up to fp16 rounding


def test_search_edge_cases_and_resident_database(vectors):
    db, queries = vectors
    sim, idx = torch_search(db[:4], queries, 10, chunk=3)
    assert idx.shape == (70, 4) and np.all(np.diff(sim, axis=1) <= 0)
    assert_exact_top_k(db[:4], queries, sim, idx, 4)
    assert torch_search(db, queries[:0], 5)[1].shape == (0, 5)
    resident = search_database(db)
    resident_sim, resident_idx = torch_search(resident, queries, 5)
    assert_exact_top_k(db, queries, resident_sim, resident_idx, 5)
    np.testing.assert_allclose(resident_sim, torch_search(db, queries, 5)[0], rtol=0, atol=TOL)


def test_exact_search_on_the_array_equals_a_flat_faiss_index(vectors):
    db, queries = vectors
    sim, idx = exact_search(db, queries, 10)
    flat_sim, flat_idx = faiss_search(build_faiss_index(db, "flat"), queries, 10)
    assert_exact_top_k(db, queries, sim, idx, 10)
    np.testing.assert_allclose(sim, flat_sim, rtol=0, atol=TOL)


def test_rerank_orders_candidates_by_exact_similarity(vectors):
    db, queries = vectors
    exact_sim, exact_idx = torch_search(db, queries, 5)
    rng = np.random.default_rng(0)
    others = np.stack([rng.choice(np.setdiff1d(np.arange(len(db)), row), 20, replace=False) for row in exact_idx])
    candidates = rng.permuted(np.concatenate([exact_idx, others, np.full((len(queries), 3), -1)], axis=1), axis=1)
    sim, idx = refine(db, queries, candidates, 5, query_chunk=16)
    assert_exact_top_k(db, queries, sim, idx, 5)  # the candidates hold an exact top-5
    assert all(set(row) <= set(cand) for row, cand in zip(idx.tolist(), candidates.tolist()))
    np.testing.assert_allclose(sim, exact_sim, rtol=0, atol=TOL)
    sim, idx = refine(db, queries[:1], np.array([[7, -1, -1]]), 3)
    assert idx.tolist() == [[7, -1, -1]] and np.isinf(sim[0, 1:]).all()
    np.testing.assert_allclose(sim[0, 0], float(db[7].astype(np.float64) @ queries[0].astype(np.float64)), atol=TOL)


# --- FAISS index kinds on real descriptors --------------------------------------------------------


@pytest.fixture(scope="module")
def grown(model, photos):
    """Descriptors of real images grown to 12k near-copies (500 of each image, as `vpr bench` grows
    databases: a hard case where most neighbouring similarities differ by less than 1e-5), and 200 queries."""
    base = extract_descriptors(model, photos, ExtractOptions(num_workers=0)).descriptors
    rng = np.random.default_rng(0)
    return near_copies(base, 12000, rng), near_copies(base, 200, rng)


@pytest.fixture(scope="module")
def written(model, grown, tmp_path_factory):
    """kind -> a directory holding an index of that kind over the grown descriptors (written once;
    load it afresh in each test, since search settings change the loaded bundle)."""
    db = grown[0]
    folder = tmp_path_factory.mktemp("indexes")
    paths = [folder / f"{i}.jpg" for i in range(len(db))]
    directories = {}

    def write(kind):
        if kind not in directories:
            directories[kind] = write_index(
                folder / kind, model=model, model_pca=None, pca=None, kind=kind, source="test",
                database=GeoImageSet(paths=paths, utm=None, heading=None), descriptors=db)
        return directories[kind]

    return write


# The IVF-PQ tests share one index over 12k descriptors whose training takes ~5 s: all are marked slow, so
# `-m "not slow"` skips the build (tests/test_bench.py still searches a small IVF-PQ index quickly).
@pytest.mark.parametrize("kind", ["flat", pytest.param("ivfpq", marks=pytest.mark.slow), "hnsw"])
def test_every_index_kind_returns_exact_similarities_of_its_rows_best_first(written, grown, kind):
    """Holds by construction for every kind, whatever the kernel: k distinct rows, each with the
    exact inner product (IVF-PQ re-ranks on the stored descriptors, HNSW stores full vectors), best
    first, and rank by rank never above exact search. Flat is exact search."""
    db, queries = grown
    bundle = load_index(written(kind))
    assert (bundle.directory / "index.faiss").exists() == (kind != "flat")
    sim, idx = bundle.search(queries, 5)
    assert_valid_result(db, queries, sim, idx, 5)
    if kind == "flat":
        assert_exact_top_k(db, queries, sim, idx, 5)
        np.testing.assert_allclose(sim, torch_search(db, queries, 5)[0], rtol=0, atol=TOL)


@pytest.mark.slow
def test_ivfpq_probing_every_list_with_every_row_shortlisted_is_exact_search(written, grown):
    """With every list probed and a shortlist as long as the database, the re-ranked IVF-PQ answer is
    exact search on every CPU: PQ's compressed distances then only order a shortlist that holds
    every row. (A short shortlist is not enough: on these near-copies the PQ top-300 misses exact
    top-5 rows even with every list probed; how often is a benchmark figure.)"""
    db, queries = grown
    bundle = load_index(written("ivfpq"))
    bundle.set_search_params(nprobe=10**6)
    assert bundle.faiss_index.nprobe == bundle.faiss_index.nlist  # clamped to the lists there are
    k = -(-len(db) // 30)
    assert shortlist(k, len(db)) == len(db)
    sim, idx = bundle.search(queries, k)
    assert_exact_top_k(db, queries, sim, idx, k)


@pytest.mark.slow
def test_ivfpq_returns_the_exact_top_k_of_its_compressed_shortlist(written, grown):
    """The IVF-PQ answer is the compressed index's shortlist re-ordered by exact inner products: its
    rows come from the shortlist, their similarities are the shortlist's best exact ones, and so at
    every rank it is at least as good as the raw PQ order (whose top-k is part of the shortlist)."""
    db, queries = grown
    bundle = load_index(written("ivfpq"))
    _, candidates = faiss_search(bundle.faiss_index, queries, shortlist(5, len(db)))
    sim, idx = bundle.search(queries, 5)
    assert all(set(row) <= set(cand) for row, cand in zip(idx.tolist(), candidates.tolist()))
    best = -np.sort(-true_similarities(db, queries, candidates), axis=1)[:, :5]
    np.testing.assert_allclose(sim, best, rtol=0, atol=TOL)
    raw = -np.sort(-true_similarities(db, queries, candidates[:, :5]), axis=1)
    assert np.all(sim >= raw - TOL)


@pytest.mark.slow
def test_ivfpq_nprobe_1_searches_only_the_nearest_list(written, grown):
    """`nprobe 1` reaches FAISS: every row returned comes from one inverted list, that of the query's
    nearest centroid (any centroid tied with it within TOL), and all of that list is found (up to k)."""
    faiss = require_faiss()
    db, queries = grown
    bundle = load_index(written("ivfpq"))
    bundle.set_search_params(nprobe=1)
    index = bundle.faiss_index
    assert index.nprobe == 1
    sim, idx = bundle.search(queries, 5)
    assert_valid_result(db, queries, sim, idx, 5, complete=False)
    lists = [set(faiss.rev_swig_ptr(index.invlists.get_ids(l), index.invlists.list_size(l)).tolist())
             for l in range(index.nlist)]
    centroids = index.quantizer.reconstruct_n(0, index.nlist)
    closeness = queries.astype(np.float64) @ centroids.astype(np.float64).T
    for q, row in enumerate(idx.tolist()):
        found = {i for i in row if i >= 0}
        nearest = np.flatnonzero(closeness[q] >= closeness[q].max() - TOL)
        assert any(found <= lists[l] and len(found) == min(5, len(lists[l])) for l in nearest), (q, row)


def test_hnsw_search_settings_reach_faiss_and_enough_candidates_make_it_exact(model, grown, tmp_path):
    """`ef_search` reaches FAISS. With at most 2 * M + 1 = 65 rows no neighbour list ever fills, so
    no link is pruned and the graph stays connected; with ef_search at least the database size the
    search then visits every row: exact whatever the kernel. ef_search 1 still gives valid rows."""
    db, queries = grown[0][:60], grown[1]
    paths = [tmp_path / f"{i}.jpg" for i in range(len(db))]
    write_index(tmp_path / "idx", model=model, model_pca=None, pca=None, kind="hnsw", source="test",
                database=GeoImageSet(paths=paths, utm=None, heading=None), descriptors=db)
    bundle = load_index(tmp_path / "idx")
    bundle.set_search_params(ef_search=len(db))
    assert bundle.faiss_index.hnsw.efSearch == len(db)
    sim, idx = bundle.search(queries, 10)
    assert_exact_top_k(db, queries, sim, idx, 10)
    bundle.set_search_params(ef_search=1)
    assert bundle.faiss_index.hnsw.efSearch == 1
    assert_valid_result(db, queries, *bundle.search(queries, 10), 10, complete=False)  # may stop early


def test_faiss_indexes_stay_on_the_cpu_without_a_faiss_gpu(vectors):
    index = build_faiss_index(vectors[0], "flat")
    assert index_to_device(index, "cpu") is index
    if not torch.cuda.is_available():
        assert index_to_device(index, "cuda") is index
