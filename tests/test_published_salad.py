"""SALAD, CliqueMining and SALAD-indoor files (serizba/salad, Enrico-Chiavassa/Indoor-VPR) load strictly and
give SALAD's descriptor, restated here from the paper; EigenPlaces-indoor loads into the cosplace head.
Small: DINOv2 ViT-S/14 (the files always hold every block) with 4 clusters, on 28 x 42 inputs (6 patches)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from conftest import truncated_load_error
from vpr.data.images import preprocess
from vpr.errors import CheckpointError, UsageError
from vpr.models.methods import salad
from vpr.models.checkpoints import load_checkpoint
from vpr.models.inference import forward_batch
from vpr.models.model import ModelConfig, VPRModel
from vpr.models.formats import resolve_format
from vpr.models.vit import DinoV2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dinov2_state(gen: torch.Generator, name: str = "dinov2_vits14") -> dict:
    """A torch.hub DINOv2's state dict with random values that make every layer matter."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DinoV2(name).state_dict().items()}
    state = {}
    for key, shape in shapes.items():
        if key.endswith("gamma"):
            state[key] = torch.rand(shape, generator=gen) * 0.5 + 0.2
        elif key.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith("bias") or key in ("cls_token", "pos_embed", "mask_token"):
            state[key] = torch.randn(shape, generator=gen) * 0.3
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.03
    return state


def salad_state(gen: torch.Generator, channels: int, clusters: int, cluster_dim: int, token_dim: int, mlp: int,
                prefix: str = "aggregator.") -> dict:
    """SALAD's tensors (authors' keys: the dropout sits at index 1 of the two conv MLPs)."""
    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale
    return {prefix + k: v for k, v in {
        "token_features.0.weight": rand(mlp, channels, scale=0.1), "token_features.0.bias": rand(mlp),
        "token_features.2.weight": rand(token_dim, mlp), "token_features.2.bias": rand(token_dim),
        "cluster_features.0.weight": rand(mlp, channels, 1, 1, scale=0.1), "cluster_features.0.bias": rand(mlp),
        "cluster_features.3.weight": rand(cluster_dim, mlp, 1, 1), "cluster_features.3.bias": rand(cluster_dim),
        "score.0.weight": rand(mlp, channels, 1, 1, scale=0.1), "score.0.bias": rand(mlp),
        "score.3.weight": rand(clusters, mlp, 1, 1, scale=1.0), "score.3.bias": rand(clusters),
        "dust_bin": torch.tensor(1.3),
    }.items()}


def restated_salad(state: dict, prefix: str, patches: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """The paper: f_i, s_i, g from three MLPs; Sinkhorn on [S; z] with mass [1 .. 1, n-m] / (m+n) over the rows
    and 1 / (m+n) over the columns; V_jk = sum_i P_ki f_ji; L2 per cluster; L2([L2(g); vec(V)])."""
    def mlp(x, first, second):
        weight = lambda k: state[prefix + k + ".weight"].flatten(1)  # noqa: E731 (1x1 convs as matrices)
        hidden = F.relu(F.linear(x, weight(first), state[prefix + first + ".bias"]))
        return F.linear(hidden, weight(second), state[prefix + second + ".bias"])
    tokens = patches.flatten(2).transpose(1, 2)  # B x n x C
    f = mlp(tokens, "cluster_features.0", "cluster_features.3").transpose(1, 2)  # B x l x n
    s = mlp(tokens, "score.0", "score.3").transpose(1, 2)  # B x m x n
    g = mlp(cls, "token_features.0", "token_features.2")
    batch, m, n = s.shape
    scores = torch.cat([s, state[prefix + "dust_bin"].expand(batch, 1, n)], dim=1)
    log_a = torch.full((m + 1,), 1.0 / (m + n)).log()
    log_a[-1] = torch.tensor((n - m) / (m + n)).log()
    log_b = torch.full((n,), 1.0 / (m + n)).log()
    u, v = torch.zeros(batch, m + 1), torch.zeros(batch, n)
    for _ in range(3):
        u = log_a - torch.logsumexp(scores + v[:, None, :], dim=2)
        v = log_b - torch.logsumexp(scores + u[:, :, None], dim=1)
    plan = ((scores + u[:, :, None] + v[:, None, :]).exp() * (m + n))[:, :m]  # rescaled, dustbin dropped
    clusters = torch.stack([(f * plan[:, k:k + 1]).sum(-1) for k in range(m)], dim=2)  # B x l x m
    clusters = clusters / clusters.norm(dim=1, keepdim=True)
    out = torch.cat([g / g.norm(dim=1, keepdim=True), clusters.flatten(1)], dim=1)
    return out / out.norm(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A small SALAD VPRModel state dict (ViT-S/14, 4 clusters of 8 dims, a 5-d token, MLPs of 16) and its
    three published files: dino_salad.ckpt (raw), cliquemining.ckpt (Lightning), Indoor-VPR's (under model.)."""
    gen = torch.Generator().manual_seed(0)
    state = {f"backbone.model.{k}": v.half() for k, v in dinov2_state(gen).items()}  # half: smaller files
    state |= salad_state(gen, 384, 4, 8, 5, 16)
    folder = tmp_path_factory.mktemp("salad")
    torch.save(state, folder / "dino_salad.ckpt")
    torch.save({"epoch": 3, "global_step": 10, "pytorch-lightning_version": "2.1.2", "state_dict": state,
                "hyper_parameters": {"agg_arch": "SALAD", "lr": 6e-05}, "optimizer_states": [], "loops": {}},
               folder / "cliquemining.ckpt")
    torch.save({f"model.{k}": v for k, v in state.items()}, folder / "salad_Dinov2_8448_GB1_10_25.pth")
    return folder, state


def test_salad_file_loads_strictly_and_gives_the_papers_descriptor(published):
    folder, state = published
    model, pca = load_checkpoint(folder / "dino_salad.ckpt")
    c = model.config
    assert pca is None and (c.backbone, c.head, c.descriptor_dim) == ("dinov2_vits14", "salad", 5 + 4 * 8)
    assert c.head_options == {"num_clusters": 4, "cluster_dim": 8, "token_dim": 5, "mlp_dim": 16}
    # strict: every tensor of the file is used, and the model has no weight the file lacks
    converted = salad.convert_salad(state, folder / "dino_salad.ckpt", {})
    with torch.device("meta"):
        fresh = VPRModel(ModelConfig(**converted.config))
    assert set(converted.weights) == set(fresh.state_dict()) and len(converted.weights) == len(state)

    images = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        expected = restated_salad(state, "aggregator.", *model.backbone(images))
        ours = model(images)
    assert ours.shape == (2, 37)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert torch.allclose(ours.norm(dim=1), torch.ones(2))
    assert (ours[0] - ours[1]).abs().max() > 1e-2  # the images matter


def test_cliquemining_and_salad_indoor_files_are_the_same_network(published):
    folder, state = published
    images = torch.randn(1, 3, 42, 28)
    with torch.no_grad():
        reference = load_checkpoint(folder / "dino_salad.ckpt")[0](images)
        for name in ("cliquemining.ckpt", "salad_Dinov2_8448_GB1_10_25.pth"):
            model, _ = load_checkpoint(folder / name)
            assert model.config.head == "salad"
            torch.testing.assert_close(model(images), reference, atol=0, rtol=0)
    assert resolve_format("cliquemining") == "salad" and resolve_format("indoor-salad") == "salad-indoor"
    with pytest.raises(CheckpointError, match="not a SALAD-indoor checkpoint"):
        load_checkpoint(folder / "dino_salad.ckpt", fmt="salad-indoor")


def test_salad_preprocessing_is_native_size_to_multiples_of_14(published):
    folder, _ = published
    model, _ = load_checkpoint(folder / "dino_salad.ckpt")
    c = model.config
    assert (c.resize, c.multiple, c.interpolation, c.resampler) == ("native", 14, "bilinear", "torch")
    assert c.mean == (0.485, 0.456, 0.406) and c.std == (0.229, 0.224, 0.225)
    img = Image.new("RGB", (50, 30), (200, 30, 90))  # 30 x 50 -> 28 x 56 (round(30/14) = 2, round(50/14) = 4)
    pixels = preprocess(img, c.preprocess)
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 28, 56)
    expected = F.interpolate(torch.tensor([200.0, 30.0, 90.0])[None, :, None, None].expand(1, 3, 30, 50),
                             size=(28, 56), mode="bilinear", antialias=True, align_corners=False)[0]
    torch.testing.assert_close(pixels, expected)
    descriptors = forward_batch(model, pixels[None])
    assert descriptors.shape == (1, 37) and torch.allclose(descriptors.norm(dim=1), torch.ones(1))
    with pytest.raises(UsageError, match="SALAD with 4 clusters needs more than 4 patches"):
        model(torch.zeros(1, 3, 28, 28))  # 2 x 2 patches: the dustbin's mass n - m would be negative


def test_default_salad_head_is_the_published_8448():
    config = ModelConfig(backbone="dinov2_vitb14", head="salad", input_size=(322, 322))
    with torch.device("meta"):
        head = VPRModel(config).head
    assert config.descriptor_dim == 8448 and head.num_clusters == 64 and head.cluster_dim == 128
    assert head.score[0].weight.shape == (512, 768, 1, 1) and head.token_features[2].weight.shape == (256, 512)
    cnn = ModelConfig(backbone="resnet18", head="salad")
    with pytest.raises(UsageError, match="DINOv2 tokens"), torch.device("meta"):
        VPRModel(cnn)


def test_damaged_salad_files_name_the_method(published, tmp_path):
    folder, state = published
    assert "SALAD" in truncated_load_error(folder / "dino_salad.ckpt", tmp_path / "dino_salad.ckpt", 100_000)
    broken = tmp_path / "broken.ckpt"
    torch.save({k: v for k, v in state.items() if k not in ("aggregator.score.3.weight", "aggregator.dust_bin")}, broken)
    with pytest.raises(CheckpointError, match="not a SALAD/CliqueMining checkpoint: missing aggregator.score.3.weight"):
        load_checkpoint(broken)
    torch.save({**state, "aggregator.extra": torch.zeros(1)}, broken)
    with pytest.raises(CheckpointError, match="unexpected tensors: aggregator.extra"):
        load_checkpoint(broken)
    torch.save({k: v for k, v in state.items() if not k.startswith("backbone.model.blocks.11.")}, broken)
    with pytest.raises(CheckpointError, match="11 DINOv2 blocks; dinov2_vits14 has 12"):
        load_checkpoint(broken)
    torch.save({k: v for k, v in state.items() if k != "backbone.model.blocks.3.ls1.gamma"}, broken)
    with pytest.raises(CheckpointError, match="missing backbone.model.blocks.3.ls1.gamma"):
        load_checkpoint(broken)


def test_eigenplaces_indoor_file_loads_into_the_cosplace_head(tmp_path):
    """Indoor-VPR's EigenPlaces: an EigenPlaces network under `model.`: L2 -> GeM -> Linear -> L2."""
    torch.manual_seed(1)
    resnet = torchvision.models.resnet18(weights=None).eval()
    trunk = torch.nn.Sequential(*list(resnet.children())[:-2])
    state = {f"model.backbone.{k}": v for k, v in trunk.state_dict().items()}
    state |= {"model.aggregation.1.p": torch.tensor([2.5]), "model.aggregation.3.weight": torch.randn(16, 512) * 0.1,
              "model.aggregation.3.bias": torch.randn(16) * 0.01}
    path = tmp_path / "eigenplaces_ResNet50_2048_GB1_BAI_5_10.pth"
    torch.save(state, path)
    model, pca = load_checkpoint(path)
    c = model.config
    assert pca is None and (c.backbone, c.layer, c.head, c.descriptor_dim) == ("resnet18", 4, "cosplace", 16)
    assert (c.resize, c.multiple) == ("native", 1)
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        x = F.normalize(trunk(images), dim=1).clamp(min=1e-6).pow(2.5).mean((2, 3)).pow(1 / 2.5)
        expected = F.normalize(F.linear(x, state["model.aggregation.3.weight"], state["model.aggregation.3.bias"]), dim=1)
        ours = model(images)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    torch.save({k: v for k, v in state.items() if k != "model.aggregation.3.bias"}, path)
    with pytest.raises(CheckpointError, match="EigenPlaces-indoor"):
        load_checkpoint(path, fmt="eigenplaces-indoor")


def test_published_salad_files_are_listed():
    files = {entry.file: entry.url for layout in salad.LAYOUTS for entry in layout.published}
    assert files["dino_salad.ckpt"].endswith("/v1.0.0/dino_salad.ckpt") and "cliquemining.ckpt" in files
    assert "salad_Dinov2_8448_GB1_10_25.pth" in files and "eigenplaces_ResNet50_2048_GB1_BAI_5_10.pth" in files
