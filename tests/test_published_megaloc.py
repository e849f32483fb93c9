"""MegaLoc's model.safetensors (gmberton/MegaLoc, Hugging Face gberton/MegaLoc) loads strictly and gives
L2(W SALAD(x) + b), restated here; its preprocessing (native size, sides to multiples of 14) is stored.
Small: DINOv2 ViT-S/14 (the file always holds every block), 4 clusters of 6 dims, an 8-d output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from test_published_salad import dinov2_state, restated_salad, salad_state

from conftest import truncated_load_error
from vpr.data.images import preprocess
from vpr.errors import CheckpointError
from vpr.models.methods import megaloc
from vpr.models.checkpoints import load_checkpoint
from vpr.models.inference import forward_batch
from vpr.models.model import ModelConfig, VPRModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """MegaLoc's state dict as `model.safetensors` holds it: its ViT has no mask_token."""
    gen = torch.Generator().manual_seed(5)
    state = {f"backbone.{k}": v.half() for k, v in dinov2_state(gen).items() if k != "mask_token"}
    state |= salad_state(gen, 384, 4, 6, 5, 16, prefix="aggregator.agg.")
    state |= {"aggregator.linear.weight": torch.randn(8, 5 + 4 * 6, generator=gen) * 0.3,
              "aggregator.linear.bias": torch.randn(8, generator=gen) * 0.05}
    path = tmp_path_factory.mktemp("megaloc") / "model.safetensors"
    save_file(state, str(path))
    return path, state


def test_megaloc_file_loads_strictly_and_gives_the_papers_descriptor(published):
    path, state = published
    model, pca = load_checkpoint(path)
    c = model.config
    assert pca is None and (c.backbone, c.head, c.descriptor_dim) == ("dinov2_vits14", "megaloc", 8)
    assert c.head_options == {"num_clusters": 4, "cluster_dim": 6, "token_dim": 5, "mlp_dim": 16, "out_dim": 8}
    converted = megaloc.convert_megaloc(state, path, {})
    with torch.device("meta"):
        fresh = VPRModel(ModelConfig(**converted.config))
    # strict: every tensor of the file is used; the only addition is vpr's unused DINOv2 mask token
    ours = {k if k.startswith("backbone.") else "head." + k[len("aggregator."):] for k in state}
    assert set(converted.weights) == set(fresh.state_dict()) == ours | {"backbone.mask_token"}
    assert not converted.weights["backbone.mask_token"].any()

    images = torch.randn(2, 3, 42, 28)
    with torch.no_grad():
        salad = restated_salad(state, "aggregator.agg.", *model.backbone(images))
        expected = F.normalize(F.linear(salad, state["aggregator.linear.weight"], state["aggregator.linear.bias"]), dim=1)
        ours = model(images)
    assert ours.shape == (2, 8)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert (ours[0] - ours[1]).abs().max() > 1e-2


def test_megaloc_preprocessing_is_native_size_to_multiples_of_14(published):
    path, _ = published
    model, _ = load_checkpoint(path)
    c = model.config
    assert (c.resize, c.multiple, c.interpolation, c.resampler) == ("native", 14, "bilinear", "torch")
    pixels = preprocess(Image.new("RGB", (43, 29), (10, 120, 250)), c.preprocess)  # 29 x 43 -> 28 x 42
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 28, 42)
    descriptors = forward_batch(model, pixels[None])
    assert descriptors.shape == (1, 8) and torch.allclose(descriptors.norm(dim=1), torch.ones(1))


def test_default_megaloc_head_is_the_published_8448():
    config = ModelConfig(backbone="dinov2_vitb14", head="megaloc")
    with torch.device("meta"):
        head = VPRModel(config).head
    assert config.descriptor_dim == 8448 and head.linear.weight.shape == (8448, 256 + 64 * 256)
    assert head.agg.cluster_features[3].weight.shape == (256, 512, 1, 1)


def test_damaged_megaloc_files_name_the_method(published, tmp_path):
    path, state = published
    # one line naming the published file it looks like (QAA also publishes a model.safetensors)
    assert "model.safetensors (https://huggingface.co/" in truncated_load_error(path, tmp_path / "model.safetensors", 50_000)
    broken = tmp_path / "broken.safetensors"
    save_file({**state, "aggregator.linear.weight": torch.zeros(8, 30)}, str(broken))
    with pytest.raises(CheckpointError, match="aggregator.linear \\[8, 30\\] does not fit its 29-d SALAD output"):
        load_checkpoint(broken)
    save_file({k: v for k, v in state.items() if k != "aggregator.agg.dust_bin"}, str(broken))
    with pytest.raises(CheckpointError, match="not a MegaLoc checkpoint: missing aggregator.agg.dust_bin"):
        load_checkpoint(broken)
    save_file({k: v for k, v in state.items() if k != "backbone.norm.bias"}, str(broken))
    with pytest.raises(CheckpointError, match="not a MegaLoc checkpoint: missing backbone.norm.bias"):
        load_checkpoint(broken)


def test_published_megaloc_file_is_listed():
    (entry,) = megaloc.LAYOUTS[0].published
    assert entry.file == "model.safetensors" and "gberton/MegaLoc" in entry.url and entry.dims == "8448"
