"""The inference side of a model: the one rule for mixed precision (shared by extraction and
training), and the inference copy extraction runs (eval, conv+BN folded, channels_last, optionally
compiled) with its forward pass from 0..255 pixels to unit descriptors."""

from __future__ import annotations

import copy
import os
import shutil
from contextlib import nullcontext

import torch
from torch.nn.utils.fusion import fuse_conv_bn_weights

from vpr.data.images import normalize_batch
from vpr.errors import DependencyError
from vpr.models.model import VPRModel


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype for `device`: bf16, or fp16 on GPUs without bf16 (which then needs a grad scaler to train)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def fold_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Fold eval-mode BatchNorm2d layers into the Conv2d feeding them (Sequential runs, ResNet blocks), in place."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    for parent in list(module.modules()):
        if isinstance(parent, torch.nn.Sequential):
            names = [name for name, _ in parent.named_children()]
            pairs = list(zip(names, names[1:]))
        elif isinstance(parent, (BasicBlock, Bottleneck)):
            pairs = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(parent, f"conv{i}")]
        else:
            continue
        for conv_name, bn_name in pairs:
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d) and not bn.training:
                conv.weight, conv.bias = fuse_conv_bn_weights(
                    conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias,
                )
                setattr(parent, bn_name, torch.nn.Identity())
    return module


def compiled(model: VPRModel, device: torch.device) -> VPRModel:
    """`model` under `torch.compile` with one static shape; on the CPU inductor needs a C++ compiler."""
    if torch.device(device).type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")):
        raise DependencyError("`compile` on the CPU needs a C++ compiler (e.g. apt install g++); or drop `compile`")
    return torch.compile(model, dynamic=False)


def inference_model(model: VPRModel, device: torch.device) -> VPRModel:
    """A copy of `model` for extraction: on `device`, eval, conv+BN folded, channels_last.

    The caller's model is left untouched (its mode, device and weights). When no weight changes
    (no BatchNorm to fold, already on `device`), the copy shares the caller's weight tensors instead of
    duplicating them: a ViT-G or MegaLoc model is gigabytes.
    """
    device = torch.device(device)
    tensors = [*model.parameters(), *model.buffers()]
    same_device = all(t.device.type == device.type and t.device.index in (None, device.index) for t in tensors)
    if same_device and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        fast = copy.deepcopy(model, memo={id(t): t for t in tensors}).eval()  # new modules, the same tensors
        with torch.no_grad():
            for module in fast.modules():  # channels_last as new parameters: the shared ones keep their layout
                for name, param in list(module.named_parameters(recurse=False)):
                    if param.dim() == 4:
                        setattr(module, name, torch.nn.Parameter(param.contiguous(memory_format=torch.channels_last),
                                                                 requires_grad=param.requires_grad))
        return fast
    fast = copy.deepcopy(model).eval()
    with torch.no_grad():
        fold_batchnorm(fast.backbone)
    return fast.to(device, memory_format=torch.channels_last)


@torch.inference_mode()
def forward_batch(model: VPRModel, batch: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Normalise a 0..255 batch already on the model's device and return float32 unit descriptors there."""
    images = normalize_batch(batch, model.config.mean, model.config.std).contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(batch.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with autocast:
        descriptors = model(images)
    return torch.nn.functional.normalize(descriptors.float(), dim=1)
