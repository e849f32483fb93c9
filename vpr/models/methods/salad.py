"""SALAD (Izquierdo & Civera, "Optimal Transport Aggregation for Visual Place Recognition", CVPR 2024),
and the methods that publish weights for the same network: CliqueMining (Izquierdo & Civera, ECCV 2024)
and SALAD-indoor (Enrico-Chiavassa/Indoor-VPR).

A DINOv2 backbone (ViT-B/14, its final LayerNorm applied) gives n patch tokens t_1..t_n (the C x h x w
patch map, n = h*w, flattened row-major) and the class token t_{n+1}. SALAD aggregates them as:
    f_i = W_f2 ReLU(W_f1 t_i + b_f1) + b_f2 in R^l          local features   (`cluster_features`, 1x1 convs)
    s_i = W_s2 ReLU(W_s1 t_i + b_s1) + b_s2 in R^m          cluster scores   (`score`), S = [s_1 .. s_n] (m x n)
    g   = W_g2 ReLU(W_g1 t_{n+1} + b_g1) + b_g2 in R^g       global token     (`token_features`)
    S'  = [S; z 1^T]  ((m+1) x n)                           a dustbin row of one learned score z (`dust_bin`)
Optimal transport of the n features onto the m clusters and the dustbin, with mass a = [1, .., 1, n-m] / (m+n)
over the rows and b = 1 / (m+n) over the columns (so the dustbin takes the n-m features that fit no cluster):
    P' = argmax_{P 1 = a, P^T 1 = b} <P, S'> + H(P)        entropic OT, solved by 3 Sinkhorn iterations in log space:
    u = log a - logsumexp_j(S'_ij + v_j),  v = log b - logsumexp_i(S'_ij + u_i),  log P' = S' + u + v + log(m+n)
    P   = P'[1..m]                                          the dustbin row is dropped (`vpr.models.layers.log_optimal_transport`)
    V_jk = sum_i P_ki f_ji  (l x m),  V_.k <- V_.k / ||V_.k||   each cluster's aggregate, L2-normalised over its l dims
    descriptor = L2([ g / ||g|| ; vec(V) ])  in R^{g + m*l}  (vec(V) row-major: cluster_dim-major, as the authors flatten)
Published: 64 clusters of 128 dims + a 256-d token = 8448-d. SALAD needs n > m patches: with 64 clusters,
an input of at least 65 patches (e.g. 126 x 126 pixels); smaller inputs are refused with a clear error.

Layouts (keys after `module.` parts and a Lightning `state_dict` wrapper are dropped):
- salad: serizba/salad `dino_salad.ckpt` (a raw state dict of its VPRModel) and CliqueMining's
  `cliquemining.ckpt` (a Lightning checkpoint of the same VPRModel): `backbone.model.*` (the DINOv2 of
  torch.hub, keys `cls_token, pos_embed, mask_token, patch_embed.proj, blocks.N.*, norm`) +
  `aggregator.{token_features.{0,2}, cluster_features.{0,3}, score.{0,3}, dust_bin}`. The two files have
  the same keys, so `--format cliquemining` is an alias of `salad`.
- salad-indoor: Enrico-Chiavassa/Indoor-VPR `salad_Dinov2_8448_*.pth`: the same model under `model.`.
- eigenplaces-indoor: Indoor-VPR `eigenplaces_ResNet50_2048_*.pth`: an EigenPlaces (= CosPlace) network
  under `model.`: `model.backbone.N.*` (torchvision children) + `model.aggregation.{1.p, 3.weight, 3.bias}`
  (L2 -> GeM -> Linear -> L2), loaded into vpr's `cosplace` head.
Preprocessing, as gmberton/VPR-methods-evaluation runs these models: the image at its native size,
ToTensor -> Normalize(ImageNet) -> for the DINOv2 models each side resized to the nearest multiple of 14
(torchvision's tensor Resize: bilinear, antialias=True).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vpr.data.images import IMAGENET_MEAN, IMAGENET_STD
from vpr.errors import CheckpointError, UsageError
from vpr.models import vit
from vpr.models.backbones import backbone_channels
from vpr.models.formats import cosplace_head, match_backbone, trunk_weights
from vpr.models.layers import log_optimal_transport
from vpr.models.registry import Converted, Head, Layout, PublishedFile, merged_options
from vpr.models.statedict import dinov2_keys, refuse_unused, take, with_prefix

# The published SALAD's hyperparameters: `--head salad` builds it.
DEFAULTS = {"num_clusters": 64, "cluster_dim": 128, "token_dim": 256, "mlp_dim": 512}
SINKHORN_ITERS = 3
# VPR-methods-evaluation's preprocessing of every DINOv2 SALAD-style model (and MegaLoc's own).
NATIVE_14 = "native, sides to multiples of 14"
SALAD_URL = "https://github.com/serizba/salad/releases/download/v1.0.0/dino_salad.ckpt"
CLIQUEMINING_URL = "https://drive.google.com/file/d/1B06ysb-Wjb4KDcNrl-7pyj1mJve1jqdk/view"
INDOOR_URL = "https://github.com/Enrico-Chiavassa/Indoor-VPR/releases/download/v0.1.0/"
META_CHANNELS = 8  # channels for building SALAD on the meta device only to list its keys


class SALAD(nn.Module):
    """SALAD aggregator: (patch map B x C x h x w, CLS B x C) -> B x (token_dim + num_clusters * cluster_dim),
    L2-normalised (the equations are in the module docstring). Keys as the authors': the index-1 slots of
    `cluster_features` and `score` are the authors' training-time dropout (p = 0.3; identity in eval mode)."""

    def __init__(self, channels: int = 768, num_clusters: int = 64, cluster_dim: int = 128, token_dim: int = 256,
                 mlp_dim: int = 512, dropout: float = 0.3) -> None:
        super().__init__()
        self.num_clusters, self.cluster_dim, self.token_dim = num_clusters, cluster_dim, token_dim
        self.token_features = nn.Sequential(nn.Linear(channels, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, token_dim))
        self.cluster_features = nn.Sequential(
            nn.Conv2d(channels, mlp_dim, 1), nn.Dropout(dropout), nn.ReLU(), nn.Conv2d(mlp_dim, cluster_dim, 1))
        self.score = nn.Sequential(
            nn.Conv2d(channels, mlp_dim, 1), nn.Dropout(dropout), nn.ReLU(), nn.Conv2d(mlp_dim, num_clusters, 1))
        self.dust_bin = nn.Parameter(torch.tensor(1.0))

    @property
    def out_dim(self) -> int:
        return self.token_dim + self.num_clusters * self.cluster_dim

    def forward(self, features: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        patches, cls = features
        n = patches.shape[-2] * patches.shape[-1]
        if n <= self.num_clusters:
            raise UsageError(
                f"SALAD with {self.num_clusters} clusters needs more than {self.num_clusters} patches, but a "
                f"{patches.shape[-2]}x{patches.shape[-1]}-patch input has {n}: use a larger input "
                f"(e.g. `resize=322x322`)"
            )
        f = self.cluster_features(patches).flatten(2)  # B x l x n
        scores = self.score(patches).flatten(2)  # B x m x n
        g = self.token_features(cls)  # B x g
        p = log_optimal_transport(scores, self.dust_bin, SINKHORN_ITERS).exp()[:, :-1]  # B x m x n, dustbin dropped
        v = torch.einsum("bln,bmn->blm", f, p)  # V_jk = sum_i P_ki f_ji
        return F.normalize(torch.cat([F.normalize(g, dim=-1), F.normalize(v, dim=1).flatten(1)], dim=-1), dim=-1)


def head_options(config) -> dict:
    """The head's hyperparameters: `head_options` over the published defaults."""
    options = merged_options(config, DEFAULTS, "salad")
    return {k: int(v) for k, v in options.items()}


def require_vit(config, head: str) -> None:
    if config.backbone not in vit.SIZES:
        raise UsageError(f"the {head} head aggregates DINOv2 tokens: use `backbone=dinov2_vitb14` (or another "
                         f"of {', '.join(vit.SIZES)}), not {config.backbone}")


def build_head(config) -> SALAD:
    require_vit(config, "salad")
    return SALAD(config.channels, **head_options(config))


def descriptor_dim(config) -> int:
    options = head_options(config)
    return options["token_dim"] + options["num_clusters"] * options["cluster_dim"]


HEADS = (
    Head("salad", "SALAD: optimal transport (Sinkhorn, dustbin) of DINOv2 patch features onto clusters + CLS "
         "token (head_options: num_clusters, cluster_dim, token_dim, mlp_dim)",
         "token_dim + num_clusters x cluster_dim (256 + 64 x 128 = 8448)", build_head, descriptor_dim),
)


# ----------------------------------------------------------------------------------- layouts
def dinov2_backbone(state: dict[str, torch.Tensor], prefix: str, path: Path, method: str) -> tuple[str, dict]:
    """A torch.hub DINOv2 under `prefix`: (vpr backbone name, its tensors under vpr's `backbone.*` keys)."""
    (pos_embed,) = take(state, (f"{prefix}pos_embed",), path, method)
    width = int(pos_embed.shape[-1])
    name = vit.name_for_width(width)
    if name is None or tuple(pos_embed.shape) != (1, vit.GRID * vit.GRID + 1, width):
        raise CheckpointError(f"{path}: a {method} checkpoint whose DINOv2 {prefix}pos_embed is {list(pos_embed.shape)}; "
                              f"expected [1, {vit.GRID * vit.GRID + 1}, 384|768|1024|1536] (a patch-14 DINOv2 without registers)")
    weights = dinov2_keys(with_prefix(state, prefix, "backbone."))
    depth = vit.SIZES[name][1]
    blocks = {k.split(".")[2] for k in weights if k.startswith("backbone.blocks.")}
    if blocks != {str(i) for i in range(depth)}:
        raise CheckpointError(f"{path}: a {method} checkpoint with {len(blocks)} DINOv2 blocks; {name} has {depth}")
    with torch.device("meta"):
        expected = {f"backbone.{k}" for k in vit.DinoV2(name).state_dict()}
    expect_keys(weights, expected - {"backbone.mask_token"}, expected, path, method, prefix, "backbone.")
    # DINOv2's masked-modelling token is unused at inference; MegaLoc's own ViT has none: a zero one then.
    weights.setdefault("backbone.mask_token", torch.zeros(1, width))
    return name, weights


def expect_keys(tensors: dict, required: set, allowed: set, path: Path, method: str, prefix: str, ours: str) -> None:
    """Every `required` key present and nothing beyond `allowed` (keys in vpr's names; errors in the file's)."""
    missing = sorted(required - tensors.keys())
    if missing:
        raise CheckpointError(f"{path}: not a {method} checkpoint: missing "
                              f"{', '.join(prefix + k[len(ours):] for k in missing[:4])}{', ...' if len(missing) > 4 else ''}")
    extra = sorted(tensors.keys() - allowed)
    if extra:
        raise CheckpointError(f"{path}: a {method} checkpoint with unexpected tensors: "
                              f"{', '.join(prefix + k[len(ours):] for k in extra[:4])}{', ...' if len(extra) > 4 else ''}")


def salad_weights(state: dict[str, torch.Tensor], prefix: str, options: dict, head: str, path: Path,
                  method: str) -> dict[str, torch.Tensor]:
    """SALAD's tensors under `prefix` as vpr's `head`-prefixed keys, checked to be exactly SALAD's."""
    weights = with_prefix(state, prefix, head)
    with torch.device("meta"):
        expected = {head + k for k in SALAD(META_CHANNELS, **options).state_dict()}
    expect_keys(weights, expected, expected, path, method, prefix, head)
    return weights


def salad_options(state: dict[str, torch.Tensor], prefix: str, path: Path, method: str) -> dict:
    """SALAD's hyperparameters from the shapes of its `prefix`* tensors (checks they all fit one another)."""
    keys = ("score.0.weight", "score.3.weight", "cluster_features.0.weight", "cluster_features.3.weight",
            "token_features.0.weight", "token_features.2.weight", "dust_bin")
    score0, score3, cluster0, cluster3, token0, token2, _ = take(state, tuple(prefix + k for k in keys), path, method)
    options = {"num_clusters": int(score3.shape[0]), "cluster_dim": int(cluster3.shape[0]),
               "token_dim": int(token2.shape[0]), "mlp_dim": int(score0.shape[0])}
    if not (cluster0.shape[0] == token0.shape[0] == options["mlp_dim"]):
        raise CheckpointError(f"{path}: a {method} checkpoint whose three MLPs differ in width "
                              f"({score0.shape[0]}, {cluster0.shape[0]}, {token0.shape[0]}); SALAD's share one")
    return options


def convert_salad_at(state: dict[str, torch.Tensor], path: Path, prefix: str, method: str) -> Converted:
    """SALAD's VPRModel under `prefix`: `backbone.model.*` (DINOv2) + `aggregator.*` (SALAD)."""
    options = salad_options(state, f"{prefix}aggregator.", path, method)
    name, weights = dinov2_backbone(state, f"{prefix}backbone.model.", path, method)
    refuse_unused(state, path, method, (f"{prefix}backbone.model.", f"{prefix}aggregator."))
    head = salad_weights(state, f"{prefix}aggregator.", options, "head.", path, method)
    config = dict(backbone=name, layer=4, head="salad", head_options=options,
                  descriptor_dim=options["token_dim"] + options["num_clusters"] * options["cluster_dim"],
                  **vit.dinov2_preprocessing("native"))
    return Converted(config, {**weights, **head})


SALAD_PARTS = ("dust_bin", "score.", "cluster_features.", "token_features.")


def looks_like_salad(state: dict[str, torch.Tensor], prefix: str) -> bool:
    """SALAD's VPRModel under `prefix`, recognised from any of its parts (so a damaged file is named)."""
    parts = tuple(f"{prefix}aggregator.{part}" for part in SALAD_PARTS)
    other = f"{prefix}aggregator.queries_score."  # QAA shares SALAD's module names and adds learned queries
    return (any(k.startswith(parts) for k in state) and any(k.startswith(f"{prefix}backbone.model.") for k in state)
            and not any(k.startswith(other) for k in state))


def detect_salad(state: dict[str, torch.Tensor]) -> bool:
    return looks_like_salad(state, "")


def convert_salad(state: dict[str, torch.Tensor], path: Path, extras: dict) -> Converted:
    return convert_salad_at(state, path, "", "SALAD/CliqueMining")


def detect_salad_indoor(state: dict[str, torch.Tensor]) -> bool:
    return looks_like_salad(state, "model.")


def convert_salad_indoor(state: dict[str, torch.Tensor], path: Path, extras: dict) -> Converted:
    return convert_salad_at(state, path, "model.", "SALAD-indoor")


# EigenPlaces-indoor: a CosPlace network under `model.`; the trunks it can hold, tried in order.
COSPLACE_TRUNKS = tuple((name, 4) for name in ("resnet50", "resnet101", "resnet152", "resnet18", "vgg16"))
COSPLACE_HEAD = ("model.aggregation.1.p", "model.aggregation.3.weight", "model.aggregation.3.bias")


def detect_eigenplaces_indoor(state: dict[str, torch.Tensor]) -> bool:
    return all(k in state for k in COSPLACE_HEAD) and any(k.startswith("model.backbone.") for k in state)


def convert_eigenplaces_indoor(state: dict[str, torch.Tensor], path: Path, extras: dict) -> Converted:
    """Indoor-VPR's EigenPlaces: CosPlace's layout (`vpr.models.formats`) under `model.`: `model.backbone.N.*`
    (torchvision children) + `model.aggregation.*`, run at the images' native size."""
    gem_p, fc_w, fc_b = take(state, COSPLACE_HEAD, path, "EigenPlaces-indoor")
    refuse_unused(state, path, "EigenPlaces-indoor", ("model.backbone.", "model.aggregation."))
    name, layer = match_backbone(state, "model.backbone.", path, COSPLACE_TRUNKS)
    weights = trunk_weights(state, "model.backbone.")
    dim = cosplace_head(weights, gem_p, fc_w, fc_b, backbone_channels(name, layer), path)
    # VPR-methods-evaluation runs it on images at their native size (no resize), ImageNet-normalised.
    config = dict(backbone=name, layer=layer, head="cosplace", descriptor_dim=dim, input_size=(480, 640),
                  resize="native", multiple=1, interpolation="bilinear", resampler="torch",
                  mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return Converted(config, weights)


SALAD_ROWS = (
    PublishedFile("SALAD", "DINOv2 ViT-B/14", "8448", NATIVE_14, "dino_salad.ckpt", SALAD_URL),
    PublishedFile("CliqueMining", "DINOv2 ViT-B/14", "8448", NATIVE_14, "cliquemining.ckpt", CLIQUEMINING_URL),
)
LAYOUTS = (
    Layout("salad", ("cliquemining", "clique-mining", "dino_salad"),
           "serizba/salad (torch.hub dinov2_salad), CliqueMining (serizba/cliquemining)",
           "[state_dict:] backbone.model.{cls_token, pos_embed, mask_token, patch_embed.*, blocks.N.*, norm.*} + "
           "aggregator.{token_features, cluster_features, score, dust_bin}",
           SALAD_ROWS, detect_salad, convert_salad),
    Layout("salad-indoor", ("indoor-salad",), "Enrico-Chiavassa/Indoor-VPR (method salad, backbone Dinov2)",
           "model.backbone.model.* + model.aggregator.{token_features, cluster_features, score, dust_bin}",
           tuple(PublishedFile("SALAD-indoor", "DINOv2 ViT-B/14", "8448", NATIVE_14, f"salad_Dinov2_8448_{v}.pth",
                               INDOOR_URL + f"salad_Dinov2_8448_{v}.pth") for v in ("GB1_10_25", "HB1_GB1_2_5")),
           detect_salad_indoor, convert_salad_indoor),
    Layout("eigenplaces-indoor", ("indoor-eigenplaces",), "Enrico-Chiavassa/Indoor-VPR (method eigenplaces, backbone ResNet50)",
           "model.backbone.* + model.aggregation.1.p, model.aggregation.3.weight, model.aggregation.3.bias",
           tuple(PublishedFile("EigenPlaces-indoor", "ResNet-50", "2048", "native",
                               f"eigenplaces_ResNet50_2048_{v}.pth", INDOOR_URL + f"eigenplaces_ResNet50_2048_{v}.pth")
                 for v in ("GB1_BAI_5_10", "GB1_BAI_10_25_S")),
           detect_eigenplaces_indoor, convert_eigenplaces_indoor),
)
