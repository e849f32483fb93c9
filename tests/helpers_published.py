"""Reference networks of the published CNN methods (CosPlace, EigenPlaces, pytorch-NetVlad, Patch-NetVLAD, VG
benchmark), re-stated from each repository's code and paper layer by layer with the repositories' own parameter
names, independently of vpr's implementation; and the helpers that compare vpr's descriptors with theirs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CHANNELS = {"vgg16": 512, "resnet18": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}


# ---- reference re-statements of the published architectures ------------------------------------

class RefL2Norm(nn.Module):
    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(p=2, dim=self.dim, keepdim=True).clamp(min=1e-12)


class RefGeM(nn.Module):
    """f = (mean over H, W of clamp(x, eps)^p)^(1/p)."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=1e-6).pow(self.p).mean(dim=(-2, -1), keepdim=True).pow(1.0 / self.p)


class RefFlatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


def vgg16_features() -> list[nn.Module]:
    """torchvision's VGG16 `features` (configuration D): 13 conv3x3 + ReLU, 5 max-pools."""
    layers: list[nn.Module] = []
    channels = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = v
    return layers


def ref_trunk(name: str, cut: str = "conv5") -> nn.Sequential:
    """The repositories' trunks: VGG16 features[:-2] (no last ReLU, no pool); ResNet children[:-2] or [:-3]."""
    if name == "vgg16":
        return nn.Sequential(*vgg16_features()[:-2])
    resnet = getattr(torchvision.models, name)(weights=None)
    return nn.Sequential(*list(resnet.children())[: -2 if cut == "conv5" else -3])


class RefCosPlaceNet(nn.Module):
    """CosPlace / EigenPlaces GeoLocalizationNet: backbone -> L2 -> GeM -> Flatten -> Linear -> L2."""

    def __init__(self, backbone: str, dim: int) -> None:
        super().__init__()
        self.backbone = ref_trunk(backbone)
        self.aggregation = nn.Sequential(RefL2Norm(), RefGeM(), RefFlatten(), nn.Linear(CHANNELS[backbone], dim), RefL2Norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aggregation(self.backbone(x))


class RefLoopNetVLAD(nn.Module):
    """pytorch-NetVlad's layer: L2 the input, softmax(conv) assignment, residual sums cluster by cluster."""

    def __init__(self, clusters: int, dim: int, bias: bool) -> None:
        super().__init__()
        self.clusters = clusters
        self.conv = nn.Conv2d(dim, clusters, kernel_size=(1, 1), bias=bias)
        self.centroids = nn.Parameter(torch.rand(clusters, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, p=2, dim=1)
        n, c = x.shape[:2]
        assign = F.softmax(self.conv(x).view(n, self.clusters, -1), dim=1)
        flat = x.view(n, c, -1)
        vlad = torch.zeros(n, self.clusters, c)
        for k in range(self.clusters):
            residual = flat - self.centroids[k].view(1, c, 1)
            vlad[:, k] = (residual * assign[:, k : k + 1, :]).sum(dim=-1)
        vlad = F.normalize(vlad, p=2, dim=2).view(n, -1)
        return F.normalize(vlad, p=2, dim=1)


class RefNanneNet(nn.Module):
    """pytorch-NetVlad's model (encoder, pool) with Patch-NetVLAD's optional WPCA (1x1 conv, flatten, L2)."""

    def __init__(self, clusters: int, vladv2: bool, wpca_dim: int | None = None) -> None:
        super().__init__()
        self.encoder = ref_trunk("vgg16")
        self.pool = RefLoopNetVLAD(clusters, 512, bias=vladv2)
        if wpca_dim:
            self.WPCA = nn.Sequential(nn.Conv2d(clusters * 512, wpca_dim, kernel_size=(1, 1)), RefFlatten(), RefL2Norm(dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vlad = self.pool(self.encoder(x))
        return self.WPCA(vlad[:, :, None, None]) if hasattr(self, "WPCA") else vlad


class RefBenchmarkNet(nn.Module):
    """The VG benchmark's GeoLocalizationNet: NetVLAD, or L2 -> GeM -> Flatten; optionally + Linear + L2."""

    def __init__(self, backbone: str, cut: str, aggregation: str, fc_dim: int | None, clusters: int = 4) -> None:
        super().__init__()
        self.backbone = ref_trunk(backbone, cut)
        channels = CHANNELS[backbone] // (2 if cut == "conv4" else 1)
        if aggregation == "netvlad":
            self.aggregation: nn.Module = RefLoopNetVLAD(clusters, channels, bias=False)
            features = clusters * channels
        else:
            self.aggregation = nn.Sequential(RefL2Norm(), RefGeM(), RefFlatten())
            features = channels
        if fc_dim:
            self.aggregation = nn.Sequential(self.aggregation, nn.Linear(features, fc_dim), RefL2Norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aggregation(self.backbone(x))


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Plausible random weights everywhere, BatchNorm statistics and GeM p included."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                t.zero_()
            elif name.endswith(("running_var", "weight")) and t.dim() == 1 or name.endswith(".p"):
                t.copy_(torch.rand(t.shape, generator=gen) + (2.5 if name.endswith(".p") else 0.5))
            elif name.endswith(("running_mean", "bias")):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * (2.0 / t[0].numel()) ** 0.5)
        for layer in module.modules():
            if isinstance(layer, RefLoopNetVLAD):  # a sharp soft-assignment, as NetVLAD's alpha gives
                layer.conv.weight.mul_(30.0)
                if layer.conv.bias is not None:
                    layer.conv.bias.copy_(torch.randn(layer.conv.bias.shape, generator=gen))
    return module.eval()


def random_net(cls: type[nn.Module], *args, seed: int) -> nn.Module:
    """`cls(*args)` with `randomize`d weights (built on the meta device first: no wasted init)."""
    with torch.device("meta"):
        net = cls(*args)
    return randomize(net.to_empty(device="cpu"), seed)


def images(seed: int = 0, size: tuple[int, int] = (64, 64)) -> torch.Tensor:
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))


def describe(model, pca, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return torch.from_numpy(pca.transform(out.numpy())) if pca is not None else out


def reference(ref: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ref(x)


def assert_published_defaults(model) -> None:
    assert model.config.input_size == (480, 640)
    assert model.config.mean == IMAGENET_MEAN and model.config.std == IMAGENET_STD


# ---- CosPlace / EigenPlaces ----------------------------------------------------------------------
