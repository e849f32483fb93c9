"""AnyLoc (DINOv2 facet features + hard-assignment VLAD over a published vocabulary): the combined file
`vpr join-anyloc` writes loads strictly, gives the VLAD restated here from the paper over
the value facet restated from the ViT's block, and stores AnyLoc's preprocessing in the config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from cli.app import app

from vpr.data.images import preprocess
from vpr.errors import CheckpointError, OutputError, UsageError
from vpr.models.methods import anyloc
from vpr.models.checkpoints import load_checkpoint
from vpr.models.inference import forward_batch
from vpr.models.model import ModelConfig, VPRModel
from vpr.models.vit import DinoV2

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LAYER, CLUSTERS, WIDTH = 1, 8, 384  # a ViT-S/14 read at block 1 (2 blocks run), 8 centres


@pytest.fixture(scope="module")
def dinov2_state() -> dict:
    """A ViT-S/14 state dict under DINOv2's torch.hub keys (3 of its 12 blocks: a file cut after block 2),
    with layer scales, norms and biases away from their init so every tensor matters."""
    torch.manual_seed(0)
    vit = DinoV2("dinov2_vits14", blocks=3)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.2)
            elif name.endswith("bias") or name in ("cls_token", "pos_embed"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return {k: v.clone() for k, v in vit.state_dict().items()}


def restated_value(state: dict, images: torch.Tensor) -> torch.Tensor:
    """Block LAYER's value facet: the tokens after blocks 0..LAYER-1, then LN1 and the qkv projection's
    last third (run with vpr's DinoV2 for the blocks before, restated here for the facet)."""
    before = DinoV2("dinov2_vits14", blocks=LAYER, final_norm=False)
    before.load_state_dict({k: v for k, v in state.items() if not k.startswith("norm.")
                            and not (k.startswith("blocks.") and int(k.split(".")[1]) >= LAYER)})
    n, _, h, w = images.shape
    patches, cls = before.eval()(images)
    tokens = torch.cat([cls[:, None], patches.flatten(2).transpose(1, 2)], dim=1)
    p = f"blocks.{LAYER}."
    x = F.layer_norm(tokens, (WIDTH,), state[p + "norm1.weight"], state[p + "norm1.bias"], eps=1e-6)
    qkv = F.linear(x, state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"])
    return qkv[:, 1:, 2 * WIDTH:]  # patches only, the value third


def restated_vlad(values: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """AnyLoc's VLAD as its authors loop it: nearest centre by cosine, residual sums to the raw centres,
    intra-normalisation, flatten, L2."""
    out = []
    for v in values:
        f = F.normalize(v, dim=1)
        labels = (f @ F.normalize(centers, dim=1).T).argmax(dim=1)
        vlad = torch.stack([(f[labels == k] - centers[k]).sum(dim=0) for k in range(len(centers))])
        out.append(F.normalize(F.normalize(vlad, dim=1).flatten(), dim=0))
    return torch.stack(out)


@pytest.fixture(scope="module")
def files(tmp_path_factory, dinov2_state):
    """DINOv2's file and AnyLoc's vocabulary file (a bare tensor named as AnyLoc names it), combined by vpr."""
    folder = tmp_path_factory.mktemp("anyloc")
    dinov2_path = folder / "dinov2_vits14_pretrain.pth"
    torch.save(dinov2_state, dinov2_path)
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 56, 70, generator=gen) * 2 - 1
    values = restated_value(dinov2_state, images).reshape(-1, WIDTH)
    centers = values[torch.randperm(len(values), generator=gen)[:CLUSTERS]] * (torch.rand(CLUSTERS, 1, generator=gen) + 0.5)
    centers_path = folder / f"dinov2_vits14_l{LAYER}_value_c{CLUSTERS}_urban_c_centers.pt"
    torch.save(centers, centers_path)
    out = folder / "anyloc_urban.pth"
    result = CliRunner().invoke(app, ["join-anyloc", str(dinov2_path), str(centers_path), str(out)])
    assert result.exit_code == 0, result.output
    return dinov2_path, centers_path, out, centers, images


def test_combined_file_loads_strictly_with_anyloc_preprocessing(files):
    _, _, out, centers, _ = files
    state = torch.load(out, weights_only=True)
    assert {int(k.split(".")[1]) for k in state if k.startswith("blocks.")} == {0, 1}  # later blocks not copied
    assert not any(k.startswith("norm.") for k in state) and int(state["anyloc.layer"]) == LAYER
    model, pca = load_checkpoint(out)
    c = model.config
    assert pca is None and (c.backbone, c.head) == ("dinov2_vits14", "anyloc")
    assert c.backbone_options == {"blocks": LAYER + 1, "facet": "value"} and c.head_options == {"num_clusters": CLUSTERS}
    assert c.descriptor_dim == CLUSTERS * WIDTH
    assert (c.resize, c.multiple, c.interpolation, c.resampler) == ("native", 14, "bilinear", "torch")
    assert c.mean == (0.485, 0.456, 0.406) and c.std == (0.229, 0.224, 0.225)
    assert torch.equal(model.head.centers, centers)
    img = Image.fromarray((torch.rand(120, 160, 3) * 255).byte().numpy())
    assert tuple(preprocess(img, c.preprocess).shape) == (3, 126, 154)  # round(120/14)*14, round(160/14)*14


def test_descriptor_is_the_restated_vlad(files, dinov2_state):
    _, _, out, centers, images = files
    model, _ = load_checkpoint(out)
    with torch.no_grad():
        got = model(images)
    expected = restated_vlad(restated_value(dinov2_state, images), centers)
    assert got.shape == (2, CLUSTERS * WIDTH)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.allclose(got.norm(dim=1), torch.ones(2))
    pixels = (images * 0.2 + 0.5).clamp(0, 1) * 255  # forward_batch normalises 0..255 pixels, output unit-norm
    assert torch.allclose(forward_batch(model, pixels).norm(dim=1), torch.ones(2))


def test_full_dinov2_file_with_vocabulary_drops_later_blocks(files, dinov2_state, tmp_path):
    """A file holding all of DINOv2 (every block and the final norm) + the vocabulary loads too."""
    _, _, _, centers, images = files
    state = {**dinov2_state, "anyloc.c_centers": centers, "anyloc.layer": torch.tensor(LAYER)}
    full = {k: v for k, v in state.items()}
    for i in range(3, 12):  # a whole ViT-S: 12 blocks
        full |= {k.replace("blocks.2.", f"blocks.{i}."): v for k, v in dinov2_state.items() if k.startswith("blocks.2.")}
    path = tmp_path / "full.pth"
    torch.save(full, path)
    model, _ = load_checkpoint(path)
    assert len(model.backbone.blocks) == LAYER + 1
    with torch.no_grad():
        torch.testing.assert_close(model(images), restated_vlad(restated_value(dinov2_state, images), centers),
                                   atol=1e-5, rtol=0)


def test_head_builds_from_its_name():
    config = ModelConfig(backbone="dinov2_vits14", head="anyloc", backbone_options={"blocks": 2, "facet": "value"},
                         resize="native", multiple=14, resampler="torch")
    assert config.descriptor_dim == 32 * WIDTH  # the published 32 clusters by default
    with torch.device("meta"):
        model = VPRModel(config)
    assert tuple(model.head.centers.shape) == (32, WIDTH)
    with pytest.raises(UsageError, match="anyloc head"), torch.device("meta"):
        VPRModel(ModelConfig(backbone="resnet18", head="anyloc"))


def test_wrong_files_give_one_line_errors(files, tmp_path):
    dinov2_path, centers_path, out, centers, _ = files
    state = torch.load(out, weights_only=True)
    bad = tmp_path / "bad.pth"
    torch.save({**state, "anyloc.c_centers": torch.zeros(CLUSTERS, 1536)}, bad)  # a ViT-G vocabulary on a ViT-S
    with pytest.raises(CheckpointError, match=r"AnyLoc.*c_centers \[8, 1536\] do not fit dinov2_vits14"):
        load_checkpoint(bad)
    torch.save({k: v for k, v in state.items() if not k.startswith("blocks.1.")}, bad)  # a block missing
    with pytest.raises(CheckpointError, match="AnyLoc.*DINOv2 blocks"):
        load_checkpoint(bad)
    bad.write_bytes(out.read_bytes()[: out.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match="bad.pth"):
        load_checkpoint(bad)
    wrong = tmp_path / "dinov2_vitg14_l31_value_c8_urban_c_centers.pt"
    torch.save(torch.zeros(CLUSTERS, 1536), wrong)
    result = CliRunner().invoke(app, ["join-anyloc", str(dinov2_path), str(wrong), str(tmp_path / "x.pth")])
    assert result.exit_code != 0 and not (tmp_path / "x.pth").exists()  # refused, nothing written
    mine = tmp_path / "notes.pth"
    mine.write_text("a file of the user's")
    with pytest.raises(OutputError):  # never replaces a file it did not write
        anyloc.combine(dinov2_path, centers_path, mine)
    assert mine.read_text() == "a file of the user's"
    with pytest.raises(CheckpointError, match="DINOv2 weights alone; AnyLoc also needs its vocabulary"):
        load_checkpoint(dinov2_path)
    with pytest.raises(CheckpointError, match="not a DINOv2 state dict"):
        anyloc.combine(centers_path, centers_path, tmp_path / "y.pth")
