"""A model's preprocessing is part of it: the resize rules users know from the reference tools,
stored in the index, applied the same way by extraction, `vpr query` and the API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from typer.testing import CliRunner

from cli.app import app
from conftest import run_cli

from vpr.api import Index
from vpr.data.images import Preprocess, preprocess
from vpr.errors import UsageError
from vpr.models.model import ModelConfig, build_model
from vpr.retrieval.extract import extract_descriptors
from vpr.retrieval.options import ExtractOptions


def photo(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(("rule", "size", "expected"), [
    (Preprocess("fixed", (322, 322)), (120, 160), (322, 322)),
    (Preprocess("shorter", (224, 224)), (120, 160), (224, 298)),  # long side int(224 * 160 / 120), as torchvision
    (Preprocess("shorter", (224, 224)), (160, 120), (298, 224)),
    (Preprocess("native"), (120, 160), (120, 160)),
    (Preprocess("native", multiple=14), (120, 160), (126, 154)),  # round(120 / 14) = 9, round(160 / 14) = 11
    (Preprocess("shorter", (224, 224), multiple=14), (120, 160), (224, 294)),
    (Preprocess("native", multiple=14), (21, 35), (28, 28)),  # Python's round: 1.5 -> 2, 2.5 -> 2
])
def test_resize_rules_give_the_reference_tools_sizes(rule, size, expected):
    assert rule.output_size(*size) == expected
    assert tuple(preprocess(photo(*size), rule).shape) == (3, *expected)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_float_resampling_equals_torchvisions_tensor_resize_after_normalisation(interpolation):
    """The published DINOv2-era pipeline: ToTensor -> Normalize -> Resize(antialias=True) on the tensor."""
    image = photo(120, 160, seed=1)
    rule = Preprocess("shorter", (100, 100), multiple=14, interpolation=interpolation, resampler="torch")
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    mode = TF.InterpolationMode.BICUBIC if interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
    reference = (TF.to_tensor(image) - mean) / std
    reference = TF.resize(reference, 100, interpolation=mode, antialias=True)
    h, w = reference.shape[-2:]
    reference = TF.resize(reference, [round(h / 14) * 14, round(w / 14) * 14], interpolation=mode, antialias=True)
    ours = (preprocess(image, rule) / 255.0 - mean) / std
    assert ours.dtype == torch.float32 and ours.shape == reference.shape
    assert float((ours - reference).abs().max()) < 1e-5


def test_pil_resampling_is_vprs_own_8_bit_resize():
    image = photo(48, 64, seed=2)
    reference = torch.from_numpy(np.asarray(image.resize((32, 24), Image.BILINEAR), dtype=np.uint8).copy()).permute(2, 0, 1)
    assert torch.equal(preprocess(image, Preprocess("fixed", (24, 32))), reference)


def test_a_bad_rule_is_refused_when_the_config_is_built():
    with pytest.raises(UsageError, match="resize 'stretch'"):
        ModelConfig(resize="stretch")
    with pytest.raises(UsageError, match="interpolation"):
        ModelConfig(interpolation="lanczos")


def test_images_of_different_sizes_are_batched_by_size_and_keep_their_order(tmp_path):
    """At native size a batch holds several image sizes: each gets the descriptor it gets alone."""
    sizes = [(56, 70), (42, 84), (56, 70), (70, 56), (42, 84)]
    paths = []
    for i, size in enumerate(sizes):
        paths.append(tmp_path / f"{i}.png")
        photo(*size, seed=i).save(paths[-1])
    config = ModelConfig(backbone="resnet18", head="cosplace", descriptor_dim=16, resize="native", resampler="torch")
    model = build_model(config, seed=0)
    together = extract_descriptors(model, paths, ExtractOptions(batch_size=8, num_workers=0)).descriptors
    alone = np.concatenate([extract_descriptors(model, [p], ExtractOptions(batch_size=1, num_workers=0)).descriptors for p in paths])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert not np.allclose(together[0], together[1])


def test_the_rule_is_stored_in_the_index_and_used_by_queries(places, tmp_path):
    out = tmp_path / "idx"
    result = CliRunner().invoke(app, ["build-index", str(places / "database"), "--out", str(out), "--dim", "16", "--resize", "40"])
    assert result.exit_code == 0, result.output
    model = json.loads((out / "manifest.json").read_text())["model"]
    assert model["resize"] == "shorter" and model["input_size"] == [40, 40]
    index = Index.load(out)
    query = sorted((places / "queries").iterdir())[3]
    assert tuple(index.prepare(query).shape) == (3, 40, 53)  # 48x64 photos: shorter side 40, long int(40 * 64 / 48)
    assert index.query(query, k=1)[0].matches[0].path.name == sorted((places / "database").iterdir())[3].name


@pytest.mark.parametrize(("flag", "message"), [("stretch", "not HEIGHTxWIDTH"), ("9", "between 16 and 4096")])
def test_a_bad_resize_flag_is_a_one_line_usage_error(places, monkeypatch, capsys, tmp_path, flag, message):
    code, _, err = run_cli(monkeypatch, capsys, "build-index", places / "database", "--out", tmp_path / "i", "--resize", flag)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
