"""AnyLoc (Keetha et al., "AnyLoc: Towards Universal Visual Place Recognition", RA-L 2023):
AnyLoc-VLAD-DINOv2, training-free VLAD over DINOv2 ViT-G/14 features with a published vocabulary.

Features: the `value` facet of block l = 31 of DINOv2 ViT-G/14 (the 32nd of 40 blocks: the blocks
after it and the final LayerNorm are not run), one per patch, L2-normalised:
    v_i = [W_qkv LN1(x_i^(l)) + b_qkv]_value in R^C (C = 1536),   f_i = v_i / ||v_i||     (CLS token dropped)
Hard-assignment VLAD over K = 32 published cluster centres c_1..c_K (a k-means vocabulary, cosine mode;
the centres are used as stored, not normalised, in the residuals):
    k(i) = argmax_k <f_i, c_k / ||c_k||>                     nearest centre by cosine similarity
    V_k  = sum_{i : k(i) = k} (f_i - c_k)  in R^C            residual sums (zero for an empty cluster)
    V_k <- V_k / ||V_k||                                     intra-normalisation
    descriptor = L2(vec(V)) in R^{K*C}                        vec(V) = [V_1; ..; V_K] (49152-d for 32 x 1536)
Preprocessing as AnyLoc/DINO's hub model runs in gmberton/VPR-methods-evaluation (`--method anyloc-DOMAIN`):
native image size, ToTensor -> Normalize(ImageNet) -> each side resized to the nearest multiple of 14
(torchvision's tensor Resize: bilinear, antialias=True).

Files: AnyLoc publishes its vocabularies separately from DINOv2's weights, so vpr reads ONE combined file:
- `dinov2_vitg14_pretrain.pth` (facebookresearch/dinov2, the file behind torch.hub's `dinov2_vitg14`:
  `cls_token, pos_embed, mask_token, patch_embed.proj.*, blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma,
  norm2, mlp.w12, mlp.w3, ls2.gamma}, norm.*`),
- `dinov2_vitg14_l31_value_c32_DOMAIN_c_centers.pt` (AnyLoc/DINO release v1: a bare K x C tensor; domains
  urban, indoor, aerial, structured, unstructured, global),
are joined by `vpr join-anyloc DINOV2.pth C_CENTERS.pt OUT.pth` into the DINOv2 state dict (blocks
0..l only: the later blocks and the final LayerNorm are never run) plus `anyloc.c_centers` (K x C),
`anyloc.layer` (l) and `anyloc.facet` (index into query, key, value, token), read from the vocabulary's
file name. Layout `anyloc` detects `anyloc.c_centers` + DINOv2 keys (all blocks, or blocks 0..l).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vpr.errors import CheckpointError, UsageError
from vpr.fileio import atomic_file, check_replaceable_file
from vpr.models import vit
from vpr.models.registry import Converted, Head, Layout, PublishedFile, merged_options
from vpr.models.statedict import dinov2_keys, refuse_unused, take

DEFAULTS = {"num_clusters": 32}  # the published vocabularies: `--head anyloc` builds this size
PUBLISHED_LAYER, PUBLISHED_FACET = 31, "value"
FACETS = ("query", "key", "value", "token")  # `anyloc.facet` indexes this tuple
DOMAINS = ("urban", "indoor", "aerial", "structured", "unstructured", "global")
CENTERS_URL = "https://github.com/AnyLoc/DINO/releases/download/v1/"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_pretrain.pth"
# VPR-methods-evaluation's preprocessing: native size, sides to the nearest multiple of 14 (tensor resize).
DINOV2_KEYS = ("cls_token", "pos_embed", "mask_token", "patch_embed.", "blocks.", "norm.")  # torch.hub DINOv2's
CENTERS_NAME = re.compile(r"(dinov2_vit[sblg]14)_l(\d+)_(query|key|value|token)_c(\d+)_(\w+?)_c_centers\.pt$")


class AnyLocVLAD(nn.Module):
    """Hard-assignment VLAD over a fixed vocabulary `centers` (K x C): (patch map B x C x h x w, CLS) ->
    B x (K*C), L2-normalised (equations in the module docstring)."""

    def __init__(self, channels: int = 1536, num_clusters: int = 32) -> None:
        super().__init__()
        self.num_clusters = num_clusters
        self.register_buffer("centers", torch.zeros(num_clusters, channels))

    def forward(self, features: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        patches = features[0] if isinstance(features, (tuple, list)) else features
        f = F.normalize(patches.flatten(2).transpose(1, 2), dim=-1)  # B x n x C, f_i = v_i / ||v_i||
        labels = (f @ F.normalize(self.centers, dim=1).T).argmax(dim=-1)  # B x n, k(i)
        residuals = f - self.centers[labels]  # f_i - c_k(i)
        vlad = torch.zeros(f.shape[0], self.num_clusters, f.shape[2], dtype=f.dtype, device=f.device)
        vlad.scatter_add_(1, labels.unsqueeze(-1).expand_as(residuals), residuals)  # V_k
        vlad = F.normalize(vlad, dim=2)  # intra-normalisation (an empty cluster stays zero)
        return F.normalize(vlad.flatten(1), dim=1)


def head_options(config) -> dict:
    options = merged_options(config, DEFAULTS, "anyloc")
    return {k: int(v) for k, v in options.items()}


def build_head(config) -> AnyLocVLAD:
    if config.backbone not in vit.SIZES:
        raise UsageError(f"the anyloc head aggregates DINOv2 facet features: use `backbone=dinov2_vitg14` (or another of "
                         f"{', '.join(vit.SIZES)}) with backbone options blocks/facet, not {config.backbone}")
    return AnyLocVLAD(config.channels, head_options(config)["num_clusters"])


def descriptor_dim(config) -> int:
    return head_options(config)["num_clusters"] * config.channels


HEADS = (
    Head("anyloc", "AnyLoc-VLAD: hard-assignment VLAD of L2-normalised DINOv2 facet features (ViT-G/14 block 31 "
         "'value') over a fixed vocabulary (head_options: num_clusters; the centres come with the checkpoint)",
         "num_clusters x C (32 x 1536 = 49152)", build_head, descriptor_dim),
)


# ----------------------------------------------------------------------------------- layout
def detect_anyloc(state: dict[str, torch.Tensor]) -> bool:
    """A combined file, or DINOv2's own file alone (claimed only to say what AnyLoc also needs)."""
    if "anyloc.c_centers" in state:
        return "pos_embed" in state
    return "blocks.0.attn.qkv.weight" in state and all(k.startswith(DINOV2_KEYS) for k in state)


def convert_anyloc(state: dict[str, torch.Tensor], path: Path, extras: dict) -> Converted:
    """A combined AnyLoc file: DINOv2's torch.hub state dict + `anyloc.{c_centers, layer, facet}`."""
    method = "AnyLoc (DINOv2 + VLAD vocabulary)"
    if "anyloc.c_centers" not in state and "blocks.0.attn.qkv.weight" in state:
        raise CheckpointError(f"{path}: DINOv2 weights alone; AnyLoc also needs its vocabulary: join them with "
                              f"`vpr join-anyloc {Path(path).name} dinov2_vitg14_l31_value_c32_DOMAIN_c_centers.pt "
                              f"anyloc_DOMAIN.pth` ({CENTERS_URL}) and pass that file")
    centers, pos_embed = take(state, ("anyloc.c_centers", "pos_embed"), path, method)
    width = int(pos_embed.shape[-1])
    name = vit.name_for_width(width)
    if name is None or tuple(pos_embed.shape) != (1, vit.GRID * vit.GRID + 1, width):
        raise CheckpointError(f"{path}: an {method} file whose DINOv2 pos_embed is {list(pos_embed.shape)}; expected "
                              f"[1, {vit.GRID * vit.GRID + 1}, 384|768|1024|1536] (a patch-14 DINOv2 without registers)")
    if centers.dim() != 2 or centers.shape[1] != width or centers.shape[0] < 1:
        raise CheckpointError(f"{path}: {method} c_centers {list(centers.shape)} do not fit {name} "
                              f"(expected [K, {width}]): the vocabulary belongs to another DINOv2")
    depth = vit.SIZES[name][1]
    layer = int(state["anyloc.layer"]) if "anyloc.layer" in state else PUBLISHED_LAYER
    facet = FACETS[int(state["anyloc.facet"])] if "anyloc.facet" in state else PUBLISHED_FACET
    if not 0 <= layer < depth:
        raise CheckpointError(f"{path}: {method} layer {layer} does not exist in {name} (blocks 0..{depth - 1})")
    if any(k.startswith("blocks.") and not k.split(".")[1].isdigit() for k in state):
        raise CheckpointError(f"{path}: an {method} file with keys blocks.* that are not numbered DINOv2 blocks; "
                              "join it again from dinov2_vitg14_pretrain.pth")
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    if blocks not in (set(range(depth)), set(range(layer + 1))):  # DINOv2's file, or `combine`'s trimmed copy
        raise CheckpointError(f"{path}: an {method} file with {len(blocks)} DINOv2 blocks; expected {depth} ({name}) "
                              f"or the {layer + 1} up to block {layer} (a truncated or different file)")
    refuse_unused(state, path, method, (*DINOV2_KEYS, "anyloc."))
    # Dropped on purpose: blocks after `layer` and the final LayerNorm `norm.*` (AnyLoc reads the facet of
    # block `layer`, so they are never run). `mask_token` (DINOv2's masked-modelling token) is kept: vpr's
    # DinoV2 holds it so files load strictly.
    kept = {k: v for k, v in state.items()
            if not k.startswith(("anyloc.", "norm.")) and not (k.startswith("blocks.") and int(k.split(".")[1]) > layer)}
    weights = {f"backbone.{k}": v for k, v in dinov2_keys(kept).items()}
    weights["head.centers"] = centers
    num_clusters = int(centers.shape[0])
    backbone_options = {"blocks": layer + 1, "facet": facet}
    if facet == "token":  # the block's output tokens, without DINOv2's final LayerNorm (AnyLoc's hook)
        backbone_options["final_norm"] = False
    config = dict(backbone=name, layer=4, head="anyloc", head_options={"num_clusters": num_clusters},
                  backbone_options=backbone_options, descriptor_dim=num_clusters * width, **vit.dinov2_preprocessing("native"))
    return Converted(config, weights)


LAYOUTS = (
    Layout("anyloc", ("anyloc-vlad", "anyloc-dinov2"),
           "AnyLoc/DINO (torch.hub get_vlad_model) vocabulary + facebookresearch/dinov2 "
           "weights, joined by `vpr join-anyloc`",
           "DINOv2 keys (cls_token, pos_embed, mask_token, patch_embed.*, blocks.N.*, norm.*) + anyloc.c_centers "
           "[+ anyloc.layer, anyloc.facet]",
           (PublishedFile(f"AnyLoc-VLAD-DINOv2 ({'|'.join(DOMAINS)}), joined by vpr join-anyloc",
                          "DINOv2 ViT-G/14 block 31 value", "49152", "native, sides to multiples of 14",
                          "dinov2_vitg14_pretrain.pth + dinov2_vitg14_l31_value_c32_{DOMAIN}_c_centers.pt",
                          f"{DINOV2_URL} + {CENTERS_URL}"),),
           detect_anyloc, convert_anyloc),
)


# ----------------------------------------------------------------------------------- combine
def _load_tensors(path: Path, what: str):
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # no copy of 4.5 GB in memory
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # a pre-zip (legacy) file
    except Exception as exc:  # missing, truncated, or a full pickle
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"{path}: cannot read the {what} ({reason})") from exc


def is_joined_anyloc(path: Path) -> bool:
    """Whether `path` is a file `combine` wrote (a weights-only dict holding `anyloc.c_centers`): the
    only kind of existing file it replaces."""
    try:
        return "anyloc.c_centers" in torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format weights-only dict: not ours
        return False


def combine(dinov2: Path, centers: Path, out: Path, layer: int | None = None, facet: str | None = None) -> dict:
    """Write the combined AnyLoc file vpr reads: DINOv2's state dict + the vocabulary (+ layer, facet)."""
    state = _load_tensors(Path(dinov2), "DINOv2 weights (dinov2_vitg14_pretrain.pth)")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or "pos_embed" not in state:
        raise CheckpointError(f"{dinov2}: not a DINOv2 state dict (no pos_embed); give dinov2_vitg14_pretrain.pth ({DINOV2_URL})")
    c_centers = _load_tensors(Path(centers), "AnyLoc vocabulary (*_c_centers.pt)")
    if not isinstance(c_centers, torch.Tensor) or c_centers.dim() != 2:
        raise CheckpointError(f"{centers}: not an AnyLoc vocabulary (a K x C tensor of cluster centres)")
    match = CENTERS_NAME.search(Path(centers).name)
    if layer is None:
        layer = int(match.group(2)) if match else PUBLISHED_LAYER
    if facet is None:
        facet = match.group(3) if match else PUBLISHED_FACET
    if facet not in FACETS:
        raise UsageError(f"`facet` {facet}: choose one of {', '.join(FACETS)}")
    odd = next((k for k in state if str(k).startswith("blocks.") and not str(k).split(".")[1].isdigit()), None)
    if odd is not None:
        raise CheckpointError(f"{dinov2}: key {odd!r} is not a numbered DINOv2 block (blocks.N.*); give dinov2_vitg14_pretrain.pth "
                              f"({DINOV2_URL})")
    # Only what AnyLoc runs: blocks after `layer` and the final LayerNorm are left out (smaller file).
    combined = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.startswith("norm.")
                and not (k.startswith("blocks.") and int(k.split(".")[1]) > layer)}
    combined.update({"anyloc.c_centers": c_centers.float().contiguous(), "anyloc.layer": torch.tensor(layer),
                     "anyloc.facet": torch.tensor(FACETS.index(facet))})
    convert_anyloc(combined, Path(out), {})  # refuse a mismatched pair before writing anything
    out = Path(out)
    check_replaceable_file(out, is_joined_anyloc, "AnyLoc file", "OUT")
    with atomic_file(out) as tmp:
        torch.save(combined, tmp)
    return {"out": str(out), "backbone": vit.name_for_width(state["pos_embed"].shape[-1]), "layer": layer, "facet": facet,
            "num_clusters": int(c_centers.shape[0])}
