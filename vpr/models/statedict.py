"""Helpers for mapping a published state dict onto vpr's keys, shared by every layout.

A Linear (+ L2) after a global descriptor, y = L2(W x + b), is stored as vpr's PCA:
y = L2(((x - m) C^T) s) with s = row norms of W, C = W / s and m any point with C m = -b / s.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vpr.errors import CheckpointError
from vpr.models import vit
from vpr.models.pca import PCA


def take(state: dict[str, torch.Tensor], keys: tuple[str, ...], path: Path, what: str) -> list[torch.Tensor]:
    """The tensors at `keys`, or an error naming what is missing."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a {what} checkpoint: missing {', '.join(missing[:4])}"
                              f"{', ...' if len(missing) > 4 else ''}")
    return [state[k] for k in keys]


def with_prefix(state: dict[str, torch.Tensor], prefix: str, new_prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose keys start with `prefix`, renamed to start with `new_prefix`."""
    return {new_prefix + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def dinov2_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2's SwiGLU names (ViT-G: `mlp.w12`, `mlp.w3`) as timm's (`mlp.fc1`, `mlp.fc2`); others unchanged."""
    return {k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2."): v for k, v in tensors.items()}


def dinov2_without_norm(state: dict[str, torch.Tensor], prefix: str, path: Path, method: str) -> tuple[str, dict, dict]:
    """A torch.hub DINOv2 under `prefix` whose final LayerNorm its authors never apply (BoQ, DINO-Mix):
    (vpr backbone name, its tensors under `backbone.*` without `norm.*`, the backbone_options)."""
    (proj,) = take(state, (prefix + "patch_embed.proj.weight",), path, method)
    name = vit.name_for_width(proj.shape[0])
    if name is None:
        raise CheckpointError(f"{path}: a {method} checkpoint with a {proj.shape[0]}-wide ViT, not a DINOv2 size")
    trunk = {k: v for k, v in dinov2_keys(with_prefix(state, prefix, "backbone.")).items() if not k.startswith("backbone.norm.")}
    return name, trunk, {"final_norm": False, **vit.blocks_option(name, numbered(trunk, "backbone.blocks."))}


def numbered(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many numbered children `state` holds under `prefix` (keys `prefix`N.*): a ViT's blocks, an encoder's layers."""
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def summarize_keys(keys: list[str], limit: int = 8) -> str:
    """'conv1.* (1 tensor), layer1.* (30 tensors)': the top-level groups of a state dict, for errors."""
    groups: dict[str, int] = {}
    for key in keys:
        groups[key.split(".")[0]] = groups.get(key.split(".")[0], 0) + 1
    shown = [f"{head}.* ({count} tensor{'s' if count > 1 else ''})" for head, count in list(groups.items())[:limit]]
    return ", ".join(shown) + (", ..." if len(groups) > limit else "")


def refuse_unused(state: dict[str, torch.Tensor], path: Path, method: str,
                  prefixes: tuple[str, ...] = (), keys: tuple[str, ...] = ()) -> None:
    """A one-line error naming the tensors of a published `state` its converter would drop: those
    neither under one of `prefixes` nor among `keys` (so a file of another architecture is refused)."""
    left = sorted(k for k in state if not k.startswith(prefixes) and k not in keys)
    if left:
        article = "an" if method[:1] in "AEIOU" else "a"
        raise CheckpointError(f"{path}: {article} {method} checkpoint with unexpected tensors: {summarize_keys(left)}")


def linear_to_pca(weight: torch.Tensor, bias: torch.Tensor, whiten: bool, path: Path) -> PCA:
    """Our PCA equal to y = L2(W x + b) (see the module docstring); m is the min-norm solution."""
    components = weight.detach().to("cpu", torch.float64, copy=True)  # becomes C in place: one big copy
    scale = components.norm(dim=1)
    if bool((scale == 0).any()):
        raise CheckpointError(f"{path}: the projection has all-zero rows; the file is damaged")
    components /= scale[:, None]
    target = -bias.detach().to("cpu", torch.float64) / scale
    mean = components.T @ target  # exact when the rows are orthonormal, as in a (whitened) PCA
    if (components @ mean - target).norm() > 1e-6 * max(1.0, float(target.norm())):
        mean = torch.linalg.lstsq(components, target[:, None]).solution[:, 0]
    if (components @ mean - target).norm() > 1e-4 * max(1.0, float(target.norm())):
        raise CheckpointError(
            f"{path}: a {weight.shape[0]}x{weight.shape[1]} projection with this bias cannot be applied as a PCA; "
            "only projections to fewer dimensions are supported"
        )
    return PCA(mean=mean.float().numpy(), components=components.float().numpy(), scale=scale.float().numpy(), whiten=whiten)
