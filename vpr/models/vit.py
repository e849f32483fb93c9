"""DINOv2 ViT backbones (Oquab et al. 2023) built from timm's blocks, with DINOv2's exact keys and
position-embedding interpolation, so the authors' weights load unchanged and give their numbers.

Tokens: x = [cls; patches(image) ] + pos, patches from a 14x14 stride-14 conv. For an input other
than 518x518 the 37x37 grid of patch position embeddings is resized as DINOv2's own code does:
bicubic, no antialias, scale factors ((H/14 + 0.1) / 37, (W/14 + 0.1) / 37) on its (rows, cols):
the 0.1 offset changes the sampling positions, so it matters numerically. Each block is
x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x)) (layer scale; ViT-G's MLP is SwiGLU), and the
final LayerNorm gives DINOv2's `x_norm_clstoken` and `x_norm_patchtokens`.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from vpr.data.images import IMAGENET_MEAN, IMAGENET_STD
from vpr.errors import UsageError
from vpr.models.registry import Backbone

PATCH = 14
GRID = 37  # DINOv2's position embeddings are trained for 518 x 518 = 37 x 37 patches
INTERPOLATE_OFFSET = 0.1
# name -> (embed_dim, depth, heads, SwiGLU MLP)
SIZES = {
    "dinov2_vits14": (384, 12, 6, False),
    "dinov2_vitb14": (768, 12, 12, False),
    "dinov2_vitl14": (1024, 24, 16, False),
    "dinov2_vitg14": (1536, 40, 24, True),
}
FACETS = ("token", "query", "key", "value")
DESCRIPTIONS = {
    "dinov2_vits14": "DINOv2 ViT-S/14 (timm blocks, DINOv2 keys): (patch map, CLS) of 384 channels",
    "dinov2_vitb14": "DINOv2 ViT-B/14 (timm blocks, DINOv2 keys): (patch map, CLS) of 768 channels",
    "dinov2_vitl14": "DINOv2 ViT-L/14 (timm blocks, DINOv2 keys): (patch map, CLS) of 1024 channels",
    "dinov2_vitg14": "DINOv2 ViT-G/14 (timm blocks, SwiGLU, DINOv2 keys): (patch map, CLS) of 1536 channels",
}


def dinov2_preprocessing(resize: str = "fixed") -> dict:
    """ModelConfig fields of the published DINOv2 models' input, as their authors' pipelines compute it:
    ToTensor -> Normalize(ImageNet) -> Resize to 322 x 322 on the float tensor (bilinear, antialiased;
    `resize` "native" keeps the image's size), then sides to multiples of 14."""
    return dict(input_size=(322, 322), resize=resize, multiple=PATCH, interpolation="bilinear", resampler="torch",
                mean=IMAGENET_MEAN, std=IMAGENET_STD)


def name_for_width(width: int) -> str | None:
    """The DINOv2 model whose embeddings are `width` wide (each size has its own), or None."""
    return next((name for name, size in SIZES.items() if size[0] == int(width)), None)


def blocks_option(name: str, blocks: int) -> dict:
    """backbone_options for a DINOv2 `name` whose file holds its first `blocks` blocks: {} when it holds them all."""
    return {} if blocks == SIZES[name][1] else {"blocks": blocks}


def vit_channels(name: str) -> int:
    """Embedding width of a DINOv2 backbone."""
    return SIZES[name][0]


def interpolate_pos_embed(pos_embed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """DINOv2's position embeddings (1 x (1 + M*M) x C) for an H x W input, as DINOv2 computes them."""
    patches = pos_embed.shape[1] - 1
    h0, w0 = height // PATCH, width // PATCH
    if h0 * w0 == patches and height == width:
        return pos_embed
    previous = pos_embed.dtype
    pos = pos_embed.float()
    side = int(math.sqrt(patches))
    dim = pos.shape[-1]
    grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = ((h0 + INTERPOLATE_OFFSET) / side, (w0 + INTERPOLATE_OFFSET) / side)
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((pos[:, :1], grid), dim=1).to(previous)


class DinoV2(nn.Module):
    """A DINOv2 ViT: images (N x 3 x H x W, sides multiples of 14) -> (patch map N x C x H/14 x W/14, CLS N x C).

    `blocks` runs only the first n blocks; `facet` other than "token" returns that attention facet
    (query, key or value: the block's qkv projection of its normalised input) of block n instead of
    its output tokens (AnyLoc's features); `final_norm` applies DINOv2's last LayerNorm to tokens.
    """

    def __init__(self, name: str = "dinov2_vitb14", blocks: int | None = None, facet: str = "token",
                 final_norm: bool = True) -> None:
        super().__init__()
        from timm.layers import PatchEmbed, SwiGLUPacked
        from timm.models.vision_transformer import Block

        dim, depth, heads, swiglu = SIZES[name]
        self.depth = depth if blocks is None else blocks
        if not 1 <= self.depth <= depth:
            raise ValueError(f"blocks={blocks}: {name} has {depth} blocks")
        if facet not in FACETS:
            raise ValueError(f"facet={facet}: choose one of {', '.join(FACETS)}")
        self.facet = facet
        self.final_norm = final_norm
        self.patch_embed = PatchEmbed(img_size=None, patch_size=PATCH, embed_dim=dim, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, GRID * GRID + 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # DINOv2's masked-modelling token: unused, kept so files load strictly
        mlp = dict(mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU) if swiglu else {}
        self.blocks = nn.ModuleList(
            Block(dim, heads, qkv_bias=True, init_values=1.0, norm_layer=partial(nn.LayerNorm, eps=1e-6), **mlp)
            for _ in range(self.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6) if final_norm and facet == "token" else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """DINOv2's own random init, as its hub builders make an untrained model (dinov2 `vision_transformer.py`
        `init_weights`, `init_weights_vit_timm`; `hub/backbones.py` layer scale 1.0): position embeddings
        trunc-normal(0.02), CLS normal(1e-6), every Linear trunc-normal(0.02) with zero bias. A layer scale of 1e-5
        would leave the blocks of a model trained from scratch almost without gradient."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[CLS; patch embeddings] + position embeddings (N x (1 + h*w) x C): what the blocks take."""
        n, _, height, width = images.shape
        if height % PATCH or width % PATCH:  # DINOv2 refuses these too: whole patches only
            raise UsageError(f"a {height}x{width} input is not a multiple of {PATCH} on each side, as DINOv2 needs; "
                             f"give `resize` a size such as {height // PATCH * PATCH or PATCH}x{width // PATCH * PATCH or PATCH}")
        x = torch.cat((self.cls_token.expand(n, -1, -1), self.patch_embed(images)), dim=1)
        return x + interpolate_pos_embed(self.pos_embed, height, width)

    @staticmethod
    def split(x: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output tokens -> (patch map N x C x h x w, CLS N x C) for `images`' size."""
        n, _, height, width = images.shape
        patches = x[:, 1:].reshape(n, height // PATCH, width // PATCH, x.shape[-1]).permute(0, 3, 1, 2)
        return patches, x[:, 0]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.tokens(images)
        last = len(self.blocks) - 1 if self.facet != "token" else len(self.blocks)
        for block in self.blocks[:last]:
            x = block(x)
        if self.facet != "token":
            block = self.blocks[last]
            qkv = block.attn.qkv(block.norm1(x))
            x = qkv.chunk(3, dim=-1)[FACETS.index(self.facet) - 1]
        return self.split(self.norm(x), images)


def build(cls: type[DinoV2], name: str, options: dict, label: str) -> DinoV2:
    """`cls(name, **options)`, the backbone `label` (a `--model` name); a bad option is a one-line UsageError."""
    try:
        return cls(name, **options)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{label}: bad backbone options {options} ({exc})") from None


def vit_builder(cls: type[DinoV2], name: str, label: str):
    """A `Backbone` record's builder of `cls` at DINOv2 size `name` (ViTs have no ImageNet weights to take)."""
    def build_vit(layer: int, pretrained, options: dict) -> DinoV2:
        if pretrained is not None:
            raise UsageError(f"`pretrained`: {label} weights come with a published checkpoint; give it as `checkpoint`")
        return build(cls, name, options, label)

    return build_vit


BACKBONES = tuple(
    Backbone(name, DESCRIPTIONS[name], {4: SIZES[name][0]}, vit_builder(DinoV2, name, name), vit=True,
             preprocessing=dinov2_preprocessing())
    for name in SIZES
)
