"""Geometric re-ranking: local features, their HDF5 file, RANSAC verification and shortlist reordering."""

from __future__ import annotations

import sys

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from vpr.errors import DependencyError, ImageError, IndexFormatError, UsageError  # noqa: E402
from vpr.fileio import is_vpr_png  # noqa: E402
from vpr.retrieval.local_features import (  # noqa: E402
    LocalFeatureConfig, LocalFeatures, extract_image_features, extract_local_features, read_local_features,
    require_opencv, working_size, write_local_features,
)
from vpr.retrieval.rerank import draw_inlier_matches, rerank_shortlist, verify_pair  # noqa: E402
from vpr.retrieval.options import RerankOptions

# the 480 x 360 images are downscaled to a 400 x 300 working frame: keypoints and models change frames
CONFIG = LocalFeatureConfig(max_keypoints=800, max_side=400, min_side=100)
KNOWN_H = np.array([[0.9, 0.08, 30.0], [-0.06, 0.95, 12.0], [1.5e-4, -1.0e-4, 1.0]])


def textured(seed: int, size: tuple[int, int] = (360, 480)) -> np.ndarray:
    """A distinctive grey 'scene': random filled rectangles and circles over smooth noise."""
    rng = np.random.default_rng(seed)
    height, width = size
    noise = rng.integers(60, 200, size=(height // 24, width // 24), dtype=np.uint8)
    img = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(120):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        shade = int(rng.integers(0, 256))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x, y), (x + int(rng.integers(6, 40)), y + int(rng.integers(6, 40))), shade, -1)
        else:
            cv2.circle(img, (x, y), int(rng.integers(3, 18)), shade, -1)
    return img


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> dict:
    """`base`, `warped` (base seen through KNOWN_H) and unrelated scenes `other0..2`, as PNG files."""
    folder = tmp_path_factory.mktemp("scene")
    base = textured(1)
    images = {"base": base, "warped": cv2.warpPerspective(base, KNOWN_H, (base.shape[1], base.shape[0]))}
    images.update({f"other{i}": textured(10 + i) for i in range(3)})
    paths = {}
    for name, img in images.items():
        paths[name] = folder / f"{name}.png"
        cv2.imwrite(str(paths[name]), img)
    return paths


def project(h: np.ndarray, points: np.ndarray) -> np.ndarray:
    mapped = np.c_[points, np.ones(len(points))] @ h.T
    return mapped[:, :2] / mapped[:, 2:]


@pytest.mark.parametrize("method", ["sift", "orb"])
def test_known_homography_is_recovered_and_unrelated_images_fail(scene, method):
    config = LocalFeatureConfig(method=method, max_keypoints=800, max_side=400, min_side=100)
    base, warped, other = (extract_image_features(scene[n], config) for n in ("base", "warped", "other0"))
    assert np.allclose(base.scale, 400 / 480)
    options = RerankOptions(threshold=4.0)
    good = verify_pair(base, warped, method, options)
    assert good.inliers >= 60
    grid = np.array([[x, y] for x in (60, 240, 420) for y in (50, 180, 310)], dtype=np.float64)
    assert np.abs(project(good.model, grid) - project(KNOWN_H, grid)).max() < 2.0  # in original pixels
    assert good.pairs.shape == (good.inliers, 4)
    assert np.abs(project(KNOWN_H, good.pairs[:, :2]) - good.pairs[:, 2:]).max() < 8.0
    assert verify_pair(base, other, method, options).inliers < options.min_inliers


def test_fundamental_matrix_model(scene):
    base, warped = (extract_image_features(scene[n], CONFIG) for n in ("base", "warped"))
    check = verify_pair(base, warped, "sift", RerankOptions(model="fundamental", threshold=1.0))
    assert check.inliers >= 60
    q, c = np.c_[check.pairs[:, :2], np.ones(len(check.pairs))], np.c_[check.pairs[:, 2:], np.ones(len(check.pairs))]
    lines = q @ check.model.T  # epipolar lines F x_q in the candidate, original pixels
    distance = np.abs(np.sum(c * lines, axis=1)) / np.linalg.norm(lines[:, :2], axis=1)
    assert np.median(distance) < 1.0 and distance.max() < 3.0


def database(scene, tmp_path, config=CONFIG):
    """A features file over other0, other1, warped, other2 (the true match of `base` is row 2)."""
    paths = [scene[n] for n in ("other0", "other1", "warped", "other2")]
    out = tmp_path / "local_features.h5"
    write_local_features(out, extract_local_features(paths, config))
    return out


def test_rerank_moves_the_true_match_to_the_top(scene, tmp_path):
    query = extract_image_features(scene["base"], CONFIG)
    with read_local_features(database(scene, tmp_path), count=4) as store:
        result = rerank_shortlist(query, [0, 1, 2, 3], [0.9, 0.8, 0.7, 0.6], store, RerankOptions())
    assert result.verified
    assert result.ids.tolist() == [2, 0, 1, 3]  # the unverified keep their global order
    assert result.order.tolist() == [2, 0, 1, 3]
    assert result.inliers[0] >= 60 and all(n < RerankOptions().min_inliers for n in result.inliers[1:])
    assert len(result.pairs[0]) == result.inliers[0]


def test_too_few_inliers_keep_the_global_order(scene, tmp_path):
    query = extract_image_features(scene["base"], CONFIG)
    with read_local_features(database(scene, tmp_path)) as store:
        strict = rerank_shortlist(query, [3, 0, 2, 1], [0.9, 0.8, 0.7, 0.6], store, RerankOptions(min_inliers=10_000))
        unrelated = extract_image_features(scene["other0"], CONFIG)
        alone = rerank_shortlist(unrelated, [1, 2, 3], [0.9, 0.8, 0.7], store, RerankOptions())
    assert not strict.verified and strict.ids.tolist() == [3, 0, 2, 1]
    assert strict.inliers[2] >= 60  # counted, but below the bar
    assert not alone.verified and alone.ids.tolist() == [1, 2, 3]


def test_similarity_breaks_ties_among_equal_inlier_counts(scene, tmp_path):
    query = extract_image_features(scene["base"], CONFIG)
    with read_local_features(database(scene, tmp_path)) as store:
        result = rerank_shortlist(query, [0, 2, 1, 3], [0.5, 0.4, 0.7, 0.6], store, RerankOptions())
    assert result.ids.tolist() == [2, 1, 3, 0]


@pytest.mark.parametrize("method", ["sift", "orb"])
def test_features_file_round_trip(scene, tmp_path, method):
    config = LocalFeatureConfig(method=method, max_keypoints=300, max_side=400, min_side=100)
    paths = [scene[n] for n in ("base", "warped", "other0")]
    images = [extract_image_features(p, config) for p in paths]
    images[1].keypoints, images[1].descriptors = images[1].keypoints[:0], images[1].descriptors[:0]  # no keypoints
    out = tmp_path / "local_features.h5"
    write_local_features(out, LocalFeatures(config=config, paths=paths, images=iter(images)))
    with read_local_features(out, count=3) as store:
        assert store.config == config and store.paths == paths and len(store) == 3
        for i in (2, 0, 1):
            got = store[i]
            assert got.descriptors.dtype == np.uint8 and got.descriptors.shape[1] == (128 if method == "sift" else 32)
            np.testing.assert_array_equal(got.keypoints, images[i].keypoints)
            np.testing.assert_array_equal(got.descriptors, images[i].descriptors)
            np.testing.assert_array_equal(got.scale, images[i].scale)
    assert 0 < len(images[0].keypoints) <= 300


def test_keypoints_are_bounded_and_strongest_first(scene):
    few = extract_image_features(scene["base"], LocalFeatureConfig(max_keypoints=50))
    many = extract_image_features(scene["base"], LocalFeatureConfig(max_keypoints=400))
    assert len(few.keypoints) == 50 and len(many.keypoints) > 50


def one_line_error(excinfo, *words: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_corrupt_or_wrong_features_files(scene, tmp_path):
    import h5py

    out = database(scene, tmp_path)
    with pytest.raises(IndexFormatError) as excinfo:
        read_local_features(out, count=5)
    one_line_error(excinfo, str(out), "5", "local_features")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    with pytest.raises(IndexFormatError) as excinfo:
        with read_local_features(truncated) as store:
            [store[i] for i in range(len(store))]
    one_line_error(excinfo, str(truncated), "local_features")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["descriptors"] = np.zeros((3, 128), np.uint8)
    with pytest.raises(IndexFormatError) as excinfo:
        read_local_features(foreign)
    one_line_error(excinfo, str(foreign), "local_features")
    with h5py.File(out, "r+") as f:
        f["offsets"][-1] = 7  # rows and offsets disagree
    with pytest.raises(IndexFormatError) as excinfo:
        read_local_features(out)
    one_line_error(excinfo, str(out), "do not fit")
    with pytest.raises(IndexFormatError) as excinfo:
        read_local_features(tmp_path / "missing.h5")
    one_line_error(excinfo, "missing.h5", "local_features")


def test_bad_images_name_the_file(scene, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    for bad in (tmp_path / "missing.jpg", broken):
        with pytest.raises(ImageError) as excinfo:
            extract_image_features(bad, CONFIG)
        one_line_error(excinfo, str(bad))
    out = tmp_path / "local_features.h5"
    with pytest.raises(ImageError, match="broken.jpg"):
        write_local_features(out, extract_local_features([scene["base"], broken], CONFIG))
    assert list(tmp_path.iterdir()) == [broken]  # the atomic write left nothing behind


def test_progress_and_working_frame(scene, tmp_path):
    calls = []
    images = extract_local_features([scene["base"], scene["other0"]], CONFIG, progress=lambda *a: calls.append(a))
    write_local_features(tmp_path / "f.h5", images)
    assert calls == [(1, 2), (2, 2)]
    assert working_size(64, 32, LocalFeatureConfig()) == (480, 240)  # thumbnails are enlarged for SIFT
    assert working_size(4000, 3000, LocalFeatureConfig()) == (640, 480)
    assert working_size(2000, 100, LocalFeatureConfig()) == (640, 32)  # never past max_side


def test_draw_inlier_matches(scene, tmp_path):
    base, warped = (extract_image_features(scene[n], CONFIG) for n in ("base", "warped"))
    check = verify_pair(base, warped, "sift", RerankOptions())
    out = draw_inlier_matches(scene["base"], scene["warped"], check.pairs, tmp_path / "matches.png")
    assert is_vpr_png(out)


def test_wrong_settings_and_missing_opencv(scene, tmp_path, monkeypatch):
    with pytest.raises(UsageError):
        LocalFeatureConfig(method="surf")
    with pytest.raises(UsageError):
        RerankOptions(model="affine")
    orb_query = extract_image_features(scene["base"], LocalFeatureConfig(method="orb"))
    with read_local_features(database(scene, tmp_path)) as store, pytest.raises(UsageError, match="sift"):
        rerank_shortlist(orb_query, [0], [1.0], store, RerankOptions())
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(DependencyError, match=r"vpr\[local\]"):
        require_opencv()
