"""Import published checkpoints: detect their layout from keys and shapes, map it onto a VPRModel.

Layouts (state-dict keys after any DataParallel `module.` is dropped):
- cosplace: gmberton/CosPlace and gmberton/EigenPlaces (torch.hub and model zoos): a raw state dict
  `backbone.N...` (torchvision children) + `aggregation.{1.p, 3.weight, 3.bias}` for
  L2 -> GeM -> Flatten -> Linear -> L2.
- netvlad: Nanne/pytorch-NetVlad (`checkpoint['state_dict']`): VGG16 `encoder.N...` +
  `pool.centroids`, `pool.conv.weight` (`pool.conv.bias` only with vladv2); Patch-NetVLAD's
  files add `WPCA.0.{weight, bias}`, a 1x1 conv then L2, imported as a whitening PCA.
- benchmark: gmberton/deep-visual-geo-localization-benchmark (`checkpoint['model_state_dict']`):
  `backbone.N...` + NetVLAD (`aggregation.{centroids, conv.weight}`), NetVLAD + FC
  (`aggregation.{0.centroids, 0.conv.weight, 1.weight, 1.bias}`), GeM (`aggregation.1.p`) or
  GeM + FC (`aggregation.{0.1.p, 1.weight, 1.bias}`), GeM always with its default L2 before pooling.

All published VGG16 trunks stop before conv5_3's ReLU, as our `vgg16` does. NetVLAD without a conv
bias gets a zero bias, which is the same soft-assignment. A Linear (+ L2) after the global
descriptor is stored as our PCA (`vpr.models.statedict.linear_to_pca`, which states the equation).
Published files do not record their input size: they get DEFAULT_INPUT_SIZE and ImageNet mean/std.

Every layout is a `Layout` record (`vpr.models.registry`): these four here (`LAYOUTS`), the DINOv2-era
methods' (SALAD, MegaLoc, BoQ, MixVPR, ...) one per module under `vpr.models.methods`. A layout's
`convert` gives the config (preprocessing included) and the weights; `import_published` builds the model
on the meta device and loads them strictly, for every layout alike.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from vpr.errors import CheckpointError, UsageError
from vpr.models import registry
from vpr.models.backbones import backbone_channels, build_backbone
from vpr.models.model import ModelConfig, VPRModel
from vpr.models.pca import PCA
from vpr.models.registry import Converted, Layout, PublishedFile
from vpr.models.statedict import linear_to_pca, summarize_keys, take

DEFAULT_INPUT_SIZE = (480, 640)  # (height, width): Pitts30k's resolution and the benchmark's default resize
WRAPPER_KEYS = ("state_dict", "model_state_dict")
# Backbones a published file can hold, tried in this order; every published VGG16 is cut before the ReLU.
CANDIDATE_BACKBONES = (
    ("vgg16", 4), ("resnet18", 4), ("resnet18", 3), ("resnet50", 4), ("resnet50", 3),
    ("resnet101", 4), ("resnet101", 3), ("resnet152", 4), ("resnet152", 3),
)
COSPLACE_URL = "https://github.com/gmberton/CosPlace/releases/download/v1.0/"
EIGENPLACES_URL = "https://github.com/gmberton/EigenPlaces/releases/download/v1.0/"
CNN_INPUT = "480x640 (resize)"
LAYOUTS = (
    Layout("vpr", (), "vpr train", "format: vpr-checkpoint + config + state_dict"),
    Layout(
        "cosplace", ("eigenplaces",), "gmberton/CosPlace, gmberton/EigenPlaces (torch.hub and model zoos)",
        "backbone.* + aggregation.1.p, aggregation.3.weight, aggregation.3.bias",
        (  # as listed in the two repositories' hubconf.py
            PublishedFile("CosPlace", "ResNet-18", "32, 64, 128, 256, 512", CNN_INPUT, "ResNet18_{DIM}_cosplace.pth", COSPLACE_URL),
            PublishedFile("CosPlace", "ResNet-50/101/152", "32 ... 2048", CNN_INPUT, "ResNet50_{DIM}_cosplace.pth", COSPLACE_URL),
            PublishedFile("CosPlace", "VGG16", "64, 128, 256, 512", CNN_INPUT, "VGG16_{DIM}_cosplace.pth", COSPLACE_URL),
            PublishedFile("EigenPlaces", "ResNet-18", "256, 512", CNN_INPUT, "ResNet18_{DIM}_eigenplaces.pth", EIGENPLACES_URL),
            PublishedFile("EigenPlaces", "ResNet-50/101", "128 ... 2048", CNN_INPUT, "ResNet50_{DIM}_eigenplaces.pth", EIGENPLACES_URL),
            PublishedFile("EigenPlaces", "VGG16", "512", CNN_INPUT, "VGG16_512_eigenplaces.pth", EIGENPLACES_URL),
        ),
        lambda state: _key_groups(state) == "cosplace", lambda state, path, extras: convert_cosplace(state, path), fallback=True,
    ),
    Layout(
        "netvlad", ("pytorch-netvlad", "patchnetvlad"), "Nanne/pytorch-NetVlad, QVPR/Patch-NetVLAD",
        "state_dict: encoder.* + pool.centroids, pool.conv.weight [+ pool.conv.bias] [+ WPCA.0.weight, WPCA.0.bias]",
        (
            PublishedFile("NetVLAD (vladv1 or vladv2)", "VGG16", "K x 512 (32768)", CNN_INPUT, "checkpoint.pth.tar",
                          "train with Nanne/pytorch-NetVlad"),
            PublishedFile("Patch-NetVLAD global + WPCA", "VGG16", "128, 512, 4096", CNN_INPUT, "pittsburgh_WPCA{DIM}.pth.tar",
                          "QVPR/Patch-NetVLAD download_models.py"),
        ),
        lambda state: _key_groups(state) == "netvlad", lambda state, path, extras: convert_netvlad(state, path), fallback=True,
    ),
    Layout(
        "benchmark", ("vg-benchmark",), "gmberton/deep-visual-geo-localization-benchmark",
        "model_state_dict: backbone.* + aggregation.{centroids, conv.weight | 0.centroids, 0.conv.weight, "
        "1.weight, 1.bias | 1.p | 0.1.p, 1.weight, 1.bias}",
        (
            PublishedFile("NetVLAD [+ FC] / GeM [+ FC]", "VGG16, ResNet-18/50/101 conv4|conv5", "K x C, C or FC size",
                          CNN_INPUT, "best_model.pth", "the benchmark's model zoo"),
        ),
        lambda state: _key_groups(state) == "benchmark", lambda state, path, extras: convert_benchmark(state, path),
        fallback=True,
    ),
)


def resolve_format(fmt: str) -> str | None:
    """Canonical layout name for `--format` (aliases accepted); None for 'auto' (detect it)."""
    wanted = fmt.strip().lower()
    if wanted == "auto":
        return None
    for layout in registry.layouts().values():
        if wanted == layout.name or wanted in layout.aliases:
            return layout.name
    names = [n for layout in registry.layouts().values() for n in (layout.name, *layout.aliases)]
    raise UsageError(f"`fmt` {fmt}: unknown checkpoint format; choose auto, {', '.join(names)}")


def state_dict_of(payload: dict, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a published file: unwrap `state_dict`/`model_state_dict`, drop `module.` parts."""
    state = payload
    for key in WRAPPER_KEYS:
        if isinstance(payload.get(key), dict):
            state = payload[key]
            break
    tensors = {
        ".".join(part for part in str(k).split(".") if part != "module"): v
        for k, v in state.items() if isinstance(v, torch.Tensor)
    }
    if not tensors:
        raise CheckpointError(
            f"{path}: holds no weights (top-level keys: {', '.join(map(str, list(payload)[:8]))}); "
            f"expected one of: {expected_layouts()}"
        )
    return tensors


def expected_layouts() -> str:
    """One line listing every layout vpr reads and its identifying keys."""
    return "; ".join(f"{layout.name} ({layout.source}): {layout.keys}" for layout in registry.layouts().values())


def _key_groups(state: dict[str, torch.Tensor]) -> str | None:
    """Which CNN layout the top-level key groups say: netvlad (encoder + pool), cosplace (backbone + exactly
    CosPlace's aggregation) or benchmark (backbone + another aggregation); None for none of them."""
    groups = {key.split(".")[0] for key in state}
    if {"encoder", "pool"} <= groups:
        return "netvlad"
    if {"backbone", "aggregation"} <= groups:
        aggregation = {k for k in state if k.startswith("aggregation.")}
        cosplace = {"aggregation.1.p", "aggregation.3.weight", "aggregation.3.bias"}
        return "cosplace" if aggregation == cosplace else "benchmark"
    return None


def detect_format(state: dict[str, torch.Tensor], path: Path) -> str:
    """The layout of a published state dict, from its keys: the specific layouts (the methods') first, then
    the fallback ones (the CNN layouts, recognised by their top-level key groups)."""
    for layout in sorted(registry.layouts().values(), key=lambda layout: layout.fallback):
        if layout.detect is not None and layout.detect(state):
            return layout.name
    raise CheckpointError(
        f"{path}: unknown checkpoint layout; expected one of: {expected_layouts()}; "
        f"found {summarize_keys(list(state))} (force a layout with `fmt`)"
    )


@lru_cache(maxsize=None)
def backbone_shapes(name: str, layer: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of our trunk `name` cut at `layer` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        trunk = build_backbone(name, layer)
    return {k: tuple(v.shape) for k, v in trunk.state_dict().items()}


def match_backbone(state: dict[str, torch.Tensor], prefix: str, path: Path,
                   candidates: tuple[tuple[str, int], ...] = CANDIDATE_BACKBONES) -> tuple[str, int]:
    """(backbone, layer) among `candidates` whose torchvision keys and shapes equal the `prefix`-ed tensors of `state`."""
    found = {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
    for name, layer in candidates:
        shapes = backbone_shapes(name, layer)
        required = {k for k in shapes if not k.endswith("num_batches_tracked")}  # absent in old files
        if required <= found.keys() <= shapes.keys() and all(found[k] == shapes[k] for k in found):
            return name, layer
    first = ", ".join(f"{prefix}{k} {list(s)}" for k, s in list(found.items())[:3])
    raise CheckpointError(
        f"{path}: the {prefix}* weights ({len(found)} tensors: {first}, ...) match no supported trunk; "
        "expected torchvision children of vgg16 (conv5_3) or resnet18/50/101/152 (layer3 or layer4)"
    )


def assemble(config: ModelConfig, weights: dict[str, torch.Tensor], path: Path) -> VPRModel:
    """A VPRModel of `config` holding exactly `weights` (built on meta, then the tensors are assigned)."""
    with torch.device("meta"):
        model = VPRModel(config)
    expected = model.state_dict()
    unused = sorted(set(weights) - set(expected))
    if unused:  # every tensor of a published file is used (or dropped on purpose by its converter)
        raise CheckpointError(f"{path}: tensors {summarize_keys(unused)} have no place in {config.backbone} + {config.head}; "
                              "the file has another architecture (force a layout with `fmt`)")
    full = {}
    for key in expected:
        if key in weights:
            tensor = weights[key].detach()
            full[key] = tensor.to(torch.float32).contiguous() if tensor.is_floating_point() else tensor
        elif key.endswith("num_batches_tracked"):  # older files lack this BatchNorm counter
            full[key] = torch.zeros((), dtype=torch.long)
        else:
            raise CheckpointError(f"{path}: no weights for {key} of {config.backbone} + {config.head}")
    try:
        model.load_state_dict(full, strict=True, assign=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{path}: weights do not fit {config.backbone} + {config.head} ({detail})") from exc
    model.random_init = False  # a published file's weights
    return model.eval()


def trunk_weights(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Published trunk tensors renamed to our `backbone.*` keys."""
    return {"backbone." + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def config_for(backbone: str, layer: int, head: str, **kwargs) -> dict:
    """The config of an imported CNN model: repository defaults for input size and ImageNet normalisation."""
    return dict(backbone=backbone, layer=layer, head=head, input_size=DEFAULT_INPUT_SIZE, **kwargs)


def cosplace_head(weights: dict, gem_p: torch.Tensor, fc_w: torch.Tensor, fc_b: torch.Tensor,
                  channels: int, path: Path) -> int:
    """Fill our CosPlaceHead (norm_in, gem.p, fc, norm_out) and return the descriptor size."""
    if fc_w.dim() != 2 or fc_w.shape[1] != channels or fc_b.shape != fc_w.shape[:1] or gem_p.numel() != 1:
        raise CheckpointError(
            f"{path}: GeM/FC shapes {list(gem_p.shape)}, {list(fc_w.shape)}, {list(fc_b.shape)} do not fit "
            f"{channels} backbone channels (expected p [1], weight [D, {channels}], bias [D])"
        )
    weights.update({"head.gem.p": gem_p.reshape(1), "head.fc.weight": fc_w, "head.fc.bias": fc_b})
    return int(fc_w.shape[0])


def netvlad_head(weights: dict, centroids: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor | None,
                 channels: int, path: Path) -> int:
    """Fill our NetVLAD (conv, centroids), with a zero conv bias when the layer had none; return K."""
    clusters = int(centroids.shape[0])
    if centroids.shape != (clusters, channels) or conv_w.shape != (clusters, channels, 1, 1):
        raise CheckpointError(
            f"{path}: NetVLAD shapes centroids {list(centroids.shape)}, conv {list(conv_w.shape)} do not fit "
            f"{channels} backbone channels (expected [K, {channels}] and [K, {channels}, 1, 1])"
        )
    bias = torch.zeros(clusters) if conv_b is None else conv_b.reshape(clusters)
    weights.update({"head.centroids": centroids, "head.conv.weight": conv_w, "head.conv.bias": bias})
    return clusters


def convert_cosplace(state: dict[str, torch.Tensor], path: Path) -> Converted:
    """CosPlace / EigenPlaces: backbone.* + aggregation.{1.p, 3.weight, 3.bias}."""
    keys = ("aggregation.1.p", "aggregation.3.weight", "aggregation.3.bias")
    gem_p, fc_w, fc_b = take(state, keys, path, "CosPlace/EigenPlaces")
    backbone, layer = match_backbone(state, "backbone.", path)
    weights = trunk_weights(state, "backbone.")
    dim = cosplace_head(weights, gem_p, fc_w, fc_b, backbone_channels(backbone, layer), path)
    return Converted(config_for(backbone, layer, "cosplace", descriptor_dim=dim), weights)


def convert_netvlad(state: dict[str, torch.Tensor], path: Path) -> Converted:
    """pytorch-NetVlad / Patch-NetVLAD: encoder.* + pool.{centroids, conv.weight[, conv.bias]} [+ WPCA.0.*]."""
    centroids, conv_w = take(state, ("pool.centroids", "pool.conv.weight"), path, "pytorch-NetVlad")
    backbone, layer = match_backbone(state, "encoder.", path)
    weights = trunk_weights(state, "encoder.")
    channels = backbone_channels(backbone, layer)
    clusters = netvlad_head(weights, centroids, conv_w, state.get("pool.conv.bias"), channels, path)
    pca = None
    if "WPCA.0.weight" in state:
        wpca_w, wpca_b = take(state, ("WPCA.0.weight", "WPCA.0.bias"), path, "Patch-NetVLAD WPCA")
        if wpca_w.dim() != 4 or wpca_w.shape[1] != clusters * channels:
            raise CheckpointError(
                f"{path}: WPCA.0.weight {list(wpca_w.shape)} does not fit {clusters} x {channels} NetVLAD "
                f"(expected [D, {clusters * channels}, 1, 1])"
            )
        pca = linear_to_pca(wpca_w[:, :, 0, 0], wpca_b, whiten=True, path=path)
    return Converted(config_for(backbone, layer, "netvlad", num_clusters=clusters), weights, pca)


BENCHMARK_AGGREGATIONS = {
    "netvlad": ("aggregation.centroids", "aggregation.conv.weight"),
    "netvlad + fc": ("aggregation.0.centroids", "aggregation.0.conv.weight", "aggregation.1.weight", "aggregation.1.bias"),
    "gem": ("aggregation.1.p",),
    "gem + fc": ("aggregation.0.1.p", "aggregation.1.weight", "aggregation.1.bias"),
}


def convert_benchmark(state: dict[str, torch.Tensor], path: Path) -> Converted:
    """deep-visual-geo-localization-benchmark: backbone.* + NetVLAD / NetVLAD+FC / GeM / GeM+FC."""
    found = tuple(sorted(k for k in state if k.startswith("aggregation.")))
    kind = next((name for name, keys in BENCHMARK_AGGREGATIONS.items() if tuple(sorted(keys)) == found), None)
    if kind is None:
        expected = " | ".join(f"{name}: {', '.join(keys)}" for name, keys in BENCHMARK_AGGREGATIONS.items())
        raise CheckpointError(
            f"{path}: unsupported benchmark aggregation; expected {expected} (GeM with its default "
            f"L2 before pooling, the benchmark's default); found {', '.join(found) or 'no aggregation.* keys'}"
        )
    backbone, layer = match_backbone(state, "backbone.", path)
    weights = trunk_weights(state, "backbone.")
    channels = backbone_channels(backbone, layer)
    keys = BENCHMARK_AGGREGATIONS[kind]
    pca = None
    if kind.startswith("netvlad"):
        clusters = netvlad_head(weights, state[keys[0]], state[keys[1]], None, channels, path)
        if kind == "netvlad + fc":
            fc_w, fc_b = state[keys[2]], state[keys[3]]
            if fc_w.dim() != 2 or fc_w.shape[1] != clusters * channels:
                raise CheckpointError(
                    f"{path}: aggregation.1.weight {list(fc_w.shape)} does not fit the {clusters * channels}-d "
                    f"NetVLAD (expected [D, {clusters * channels}])"
                )
            pca = linear_to_pca(fc_w, fc_b, whiten=False, path=path)
        return Converted(config_for(backbone, layer, "netvlad", num_clusters=clusters), weights, pca)
    if kind == "gem":  # no FC: an identity layer keeps L2 -> GeM, then our final L2
        fc_w, fc_b = torch.eye(channels), torch.zeros(channels)
    else:
        fc_w, fc_b = state[keys[1]], state[keys[2]]
    dim = cosplace_head(weights, state[keys[0]], fc_w, fc_b, channels, path)
    return Converted(config_for(backbone, layer, "cosplace", descriptor_dim=dim), weights)


def import_converted(layout: Layout, state: dict[str, torch.Tensor], path: Path, extras: dict) -> tuple[VPRModel, PCA | None]:
    """A method module's layout: its `convert` gives config and weights (from the tensors and the file's
    other top-level `extras`); build and load them strictly."""
    converted: Converted = layout.convert(state, path, extras)
    try:
        config = ModelConfig(**converted.config)
    except (TypeError, UsageError) as exc:
        raise CheckpointError(f"{path}: a {layout.name} checkpoint with unsupported settings ({exc})") from exc
    return assemble(config, converted.weights, path), converted.pca


def import_published(payload: dict, path: Path, fmt: str | None = None) -> tuple[VPRModel, PCA | None]:
    """Model (and PCA, where the file has a projection) from a published checkpoint payload."""
    state = state_dict_of(payload, path)
    layout = (resolve_format(fmt) if fmt is not None else None) or detect_format(state, path)
    if layout == "vpr":
        raise CheckpointError(f"{path}: not a vpr checkpoint (no 'format': 'vpr-checkpoint'); drop `fmt=vpr`")
    extras = {key: value for key, value in payload.items() if key not in WRAPPER_KEYS and not isinstance(value, torch.Tensor)}
    return import_converted(registry.layouts()[layout], state, path, extras)


