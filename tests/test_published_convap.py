"""Conv-AP files (amaralibey/gsv-cities) load strictly and give Conv-AP's descriptors, restated here
from the paper; the preprocessing (320x320, bilinear, float resize) is stored in the config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from conftest import perturb_batchnorm, truncated_load_error
from vpr.data.images import preprocess
from vpr.errors import CheckpointError
from vpr.models.methods import convap
from vpr.models.checkpoints import load_checkpoint
from vpr.models.inference import forward_batch
from vpr.models.model import ModelConfig, VPRModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A Conv-AP file as the authors save it: a plain state dict, ResNet-50 without fc, 1x1 conv to 8 channels."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None).eval()
    gen = torch.Generator().manual_seed(1)
    perturb_batchnorm(resnet, gen)
    state = {f"backbone.model.{k}": v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    state["aggregator.channel_pool.weight"] = torch.randn(8, 2048, 1, 1, generator=gen) * 0.05
    state["aggregator.channel_pool.bias"] = torch.randn(8, generator=gen) * 0.1
    path = tmp_path_factory.mktemp("convap") / "resnet50_ConvAP_2048_2x2.ckpt"
    torch.save(state, path)
    return path, state, resnet


def restated_convap(state: dict, features: torch.Tensor, s1: int, s2: int) -> torch.Tensor:
    """The paper: G = W * F + b (1x1 conv), the mean of G over each cell of an s1 x s2 grid, L2."""
    g = torch.einsum("oc,bchw->bohw", state["aggregator.channel_pool.weight"][:, :, 0, 0], features)
    g = g + state["aggregator.channel_pool.bias"][None, :, None, None]
    height, width = g.shape[-2:]
    cells = torch.empty(g.shape[0], g.shape[1], s1, s2)
    for i in range(s1):  # adaptive pooling cells: [floor(i H / s1), ceil((i + 1) H / s1))
        for j in range(s2):
            rows = slice(i * height // s1, math.ceil((i + 1) * height / s1))
            cols = slice(j * width // s2, math.ceil((j + 1) * width / s2))
            cells[:, :, i, j] = g[:, :, rows, cols].mean(dim=(2, 3))
    return F.normalize(cells.flatten(1), dim=1)


def test_convap_file_loads_strictly_and_gives_the_papers_descriptor(published):
    path, state, resnet = published
    model, pca = load_checkpoint(path)
    c = model.config
    assert pca is None and (c.backbone, c.layer, c.head) == ("resnet50", 4, "convap")
    assert c.head_options == {"out_channels": 8, "s1": 2, "s2": 2} and c.descriptor_dim == 32
    assert (c.input_size, c.resize, c.multiple, c.interpolation, c.resampler) == ((320, 320), "fixed", 1, "bilinear", "torch")
    converted = convap.convert(state, path, {})
    with torch.device("meta"):
        fresh = VPRModel(ModelConfig(**converted.config))
    assert set(converted.weights) == set(fresh.state_dict()) and len(converted.weights) == len(state)

    images = torch.randn(2, 3, 96, 96)  # a 3x3 map: the 2x2 cells overlap
    trunk = torch.nn.Sequential(*list(resnet.children())[:-2])
    with torch.no_grad():
        expected = restated_convap(state, trunk(images), 2, 2)
        ours = model(images)
    assert ours.shape == (2, 32)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_convap_pooling_grid_comes_from_the_file_name(published, tmp_path):
    path, state, _ = published
    other = tmp_path / "resnet50_ConvAP_8_3x1.ckpt"
    other.write_bytes(path.read_bytes())
    model, _ = load_checkpoint(other)
    assert model.config.head_options == {"out_channels": 8, "s1": 3, "s2": 1} and model.config.descriptor_dim == 24
    features = torch.randn(1, 2048, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(model.head(features), restated_convap(state, features, 3, 1), atol=1e-5, rtol=0)


def test_convap_preprocessing_and_normalisation(published):
    model, _ = load_checkpoint(published[0])
    pixels = preprocess(Image.new("RGB", (160, 120), (10, 120, 240)), model.config.preprocess)
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 320, 320)
    small = torch.nn.functional.interpolate(pixels[None], size=(64, 64), mode="bilinear", antialias=True)
    descriptors = forward_batch(model, small)
    assert descriptors.shape == (1, 32) and torch.allclose(descriptors.norm(dim=1), torch.ones(1))


def test_default_convap_head_is_the_reference_tools_8192():
    config = ModelConfig(backbone="resnet50", head="convap", input_size=(320, 320))
    with torch.device("meta"):
        head = VPRModel(config).head
    assert config.descriptor_dim == 8192 and head.channel_pool.weight.shape == (2048, 2048, 1, 1)


def test_damaged_convap_files_name_the_method(published, tmp_path):
    path, state, _ = published
    assert "Conv-AP" in truncated_load_error(path, tmp_path / "resnet50_ConvAP_1024_2x2.ckpt", 100_000)
    broken = tmp_path / "broken.ckpt"
    torch.save({k: v for k, v in state.items() if k != "aggregator.channel_pool.bias"}, broken)
    with pytest.raises(CheckpointError, match="not a Conv-AP checkpoint: missing aggregator.channel_pool.bias"):
        load_checkpoint(broken)
    torch.save({**state, "aggregator.extra.weight": torch.zeros(1)}, broken)
    with pytest.raises(CheckpointError, match="Conv-AP checkpoint with unexpected tensors: aggregator"):
        load_checkpoint(broken)
