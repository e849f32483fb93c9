"""Batched descriptor extraction with a DataLoader, resumable through a descriptor cache.

The cache is keyed by image path, size and modification time and tied to the model's fingerprint,
so a rerun after a kill (or after adding images) only computes what is missing.

Speed: DataLoader workers decode and resize while the model runs; the model runs as an inference
copy (eval, conv+BN folded, channels_last) under `inference_mode`, optionally with bf16/fp16
autocast. On CUDA, batches come from pinned memory with non-blocking copies and each batch's
descriptors are copied back while the next batch runs; JPEGs can be decoded on the device
(nvJPEG) and resized there in batches (`decode_on_device`).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.utils.data import DataLoader, Dataset

from vpr.data.images import EXIF_ORIENTATION, MAX_PIXELS, image_to_tensor, load_rgb, normalize_batch
from vpr.errors import DependencyError, ImageError
from vpr.fileio import output_lock
from vpr.models.checkpoints import model_fingerprint
from vpr.models.inference import amp_dtype
from vpr.models.model import VPRModel
from vpr.retrieval.cache import DescriptorCache

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


class ImageFiles(Dataset):
    """Reads images as uint8 tensors of the model's input size; a bad file yields its error text."""

    def __init__(self, paths: list[Path], input_size: tuple[int, int]) -> None:
        self.paths = paths
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            return image_to_tensor(load_rgb(self.paths[i]), self.input_size), i, ""
        except ImageError as exc:
            return torch.zeros(3, *self.input_size, dtype=torch.uint8), i, str(exc)


def device_decodable(path: Path) -> bool:
    """Whether `path` is a plain upright RGB/grey JPEG that torchvision can decode on a device."""
    try:
        with Image.open(path) as img:
            upright = img.getexif().get(EXIF_ORIENTATION, 1) == 1
            return img.format == "JPEG" and img.mode in ("RGB", "L") and img.width * img.height <= MAX_PIXELS and upright
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


class JpegFiles(Dataset):
    """Raw JPEG bytes for decoding on the device; other files are decoded and resized here by PIL.

    Items are (tensor, is_jpeg_bytes, index, error text): a 1-D uint8 byte tensor, or a 3 x H x W
    uint8 image already at the input size.
    """

    def __init__(self, paths: list[Path], input_size: tuple[int, int]) -> None:
        self.paths = paths
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool, int, str]:
        path = self.paths[i]
        try:
            if device_decodable(path):
                return torch.from_numpy(np.fromfile(path, dtype=np.uint8)), True, i, ""
            return image_to_tensor(load_rgb(path), self.input_size), False, i, ""
        except ImageError as exc:
            return torch.zeros(0, dtype=torch.uint8), False, i, str(exc)


def _collate_lists(batch: list[tuple]) -> tuple[list[torch.Tensor], list[bool], torch.Tensor, list[str]]:
    """Keep variable-size items (JPEG bytes) as lists."""
    data, is_jpeg, index, errors = zip(*batch)
    return list(data), list(is_jpeg), torch.tensor(index), list(errors)


def _decode_jpegs(items: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEG byte tensors to 3 x h x w uint8 on `device` in one call; None where the decoder fails."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision.*")
        try:
            return list(decode_jpeg(items, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad file fails the whole call: retry one by one
            decoded: list[torch.Tensor | None] = []
            for item in items:
                try:
                    decoded.append(decode_jpeg(item, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
            return decoded


def decode_batch(
    items: list[torch.Tensor], is_jpeg: list[bool], paths: list[Path], input_size: tuple[int, int], device: torch.device,
) -> tuple[torch.Tensor, list[str]]:
    """Decode JPEG bytes on `device` and resize them there in same-size groups (bilinear, antialiased).

    Returns an N x 3 x H x W float batch of 0..255 values on `device` and an error text per item
    ("" when fine); a JPEG the device decoder rejects is retried with PIL, which names the problem.
    """
    height, width = input_size
    batch = torch.zeros(len(items), 3, height, width, device=device)
    errors = [""] * len(items)
    jpegs = [j for j, flag in enumerate(is_jpeg) if flag]
    decoded = _decode_jpegs([items[j] for j in jpegs], device) if jpegs else []
    groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    for j, image in zip(jpegs, decoded):
        if image is None:
            try:
                batch[j] = image_to_tensor(load_rgb(paths[j]), input_size).to(device)
            except ImageError as exc:
                errors[j] = str(exc)
            continue
        groups.setdefault(tuple(image.shape[1:]), []).append((j, image))
    for size, members in groups.items():
        stack = torch.stack([image for _, image in members]).float()
        if size != (height, width):
            stack = torch.nn.functional.interpolate(stack, size=input_size, mode="bilinear", antialias=True, align_corners=False)
        batch[[j for j, _ in members]] = stack.round_().clamp_(0, 255)
    for j, flag in enumerate(is_jpeg):
        if not flag and items[j].dim() == 3:
            batch[j] = items[j].to(device, non_blocking=True)
    return batch, errors


@dataclass(frozen=True)
class ExtractOptions:
    """How descriptors are computed: built once (by the CLI) and taken by every extraction caller.

    `amp`: bf16/fp16 autocast (`vpr.models.inference.amp_dtype`); `compile`: torch.compile at one
    static batch shape; `decode_on_device`: JPEGs decoded on `device` (nvJPEG on CUDA); `skip_bad`:
    unreadable images are recorded and left out instead of raising.
    """

    batch_size: int = 32
    num_workers: int = 2
    device: torch.device = torch.device("cpu")
    amp: bool = False
    compile: bool = False
    decode_on_device: bool = False
    skip_bad: bool = False


@dataclass
class Extraction:
    """Descriptors of the readable images (in input order), their indices, and what was skipped."""

    descriptors: np.ndarray
    kept: np.ndarray
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    reused: int = 0


def file_key(path: Path) -> str:
    """Cache key of an image file: path, size and mtime, so a changed file is recomputed."""
    stat = Path(path).stat()
    return f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


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
    if device.type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")):
        raise DependencyError("--compile on the CPU needs a C++ compiler (e.g. apt install g++); or drop --compile")
    return torch.compile(model, dynamic=False)


def inference_model(model: VPRModel, device: torch.device) -> VPRModel:
    """A copy of `model` for extraction: on `device`, eval, conv+BN folded, channels_last.

    The caller's model is left untouched (its mode, device and weights).
    """
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


@torch.inference_mode()
def embed_batch(model: VPRModel, batch_uint8: torch.Tensor, device: torch.device, amp: bool = False) -> torch.Tensor:
    """Normalise a uint8 batch on `device` and return float32 descriptors on the CPU."""
    device = torch.device(device)
    batch = batch_uint8.to(device, non_blocking=True)
    return forward_batch(model, batch, amp_dtype(device) if amp else None).cpu()


class _HostCopy:
    """Descriptors on their way to the host: on CUDA a non-blocking copy into pinned memory."""

    def __init__(self, rows: np.ndarray, descriptors: torch.Tensor) -> None:
        self.rows = rows
        self.event = None
        if descriptors.is_cuda:
            self.host = torch.empty(descriptors.shape, dtype=descriptors.dtype, pin_memory=True)
            self.host.copy_(descriptors, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = descriptors

    def numpy(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()


def extract_descriptors(
    model: VPRModel,
    paths: list[Path],
    *,
    batch_size: int = 32,
    num_workers: int = 2,
    device: str = "cpu",
    amp: bool = False,
    cache: Path | None = None,
    skip_bad: bool = False,
    progress: Progress | None = None,
    decode_on_device: bool = False,
    compile: bool = False,
) -> Extraction:
    """Compute L2-normalised descriptors of `paths`, reusing and extending `cache` when given.

    A bad image raises its `ImageError` unless `skip_bad`, which records it in `skipped` instead.
    `amp` runs the model under bf16 (fp16 on GPUs without bf16) autocast; `decode_on_device`
    decodes JPEGs with torchvision on `device` (nvJPEG on CUDA) instead of PIL in the workers;
    `compile` runs the model through `torch.compile` at one static batch shape (short batches are
    padded), which pays a compilation of tens of seconds once per call.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    fast = inference_model(model, dev)
    runner = compiled(fast, dev) if compile else fast
    config = model.config
    autocast_dtype = amp_dtype(dev) if amp else None

    def forward(images: torch.Tensor) -> torch.Tensor:
        n = len(images)
        if compile and n < batch_size:  # keep the compiled shape: a short batch would compile again
            images = torch.cat([images, images.new_zeros((batch_size - n, *images.shape[1:]))])
        return forward_batch(runner, images, autocast_dtype)[:n]

    dim = config.descriptor_dim
    out = np.zeros((len(paths), dim), dtype=np.float32)
    ok = np.ones(len(paths), dtype=bool)
    skipped: list[tuple[Path, str]] = []
    with output_lock(cache) if cache is not None else nullcontext():  # one writer per cache at a time
        fingerprint = model_fingerprint(model) + ("|amp" if amp else "") if cache is not None else ""  # fp32/amp never mix
        store = DescriptorCache(cache, fingerprint, dim) if cache is not None else None
        try:
            keys: list[str] = []
            todo = np.arange(len(paths))
            reused = 0
            if store is not None:
                keys = [file_key(p) if p.is_file() else f"{p}|missing" for p in paths]
                pos = store.fill(keys, out)
                todo = np.setdiff1d(todo, pos)
                reused = len(pos)
            done = reused
            if progress:
                progress(done, len(paths))
            todo_paths = [paths[i] for i in todo]
            dataset = JpegFiles(todo_paths, config.input_size) if decode_on_device else ImageFiles(todo_paths, config.input_size)
            loader = DataLoader(
                dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers if len(todo) > batch_size else 0,
                pin_memory=dev.type == "cuda", persistent_workers=False, collate_fn=_collate_lists if decode_on_device else None,
            )

            def finish(copy_: _HostCopy | None) -> None:
                nonlocal done
                if copy_ is None:
                    return
                desc = copy_.numpy()
                out[copy_.rows] = desc
                if store is not None:
                    store.append([keys[r] for r in copy_.rows], desc)
                done += len(copy_.rows)
                if progress:
                    progress(done, len(paths))

            pending: _HostCopy | None = None
            for batch in loader:
                if decode_on_device:
                    items, is_jpeg, local, errors = batch
                    rows = todo[local.numpy()]
                    images, decode_errors = decode_batch(items, is_jpeg, [paths[r] for r in rows], config.input_size, dev)
                    errors = [e or d for e, d in zip(errors, decode_errors)]
                else:
                    images, local, errors = batch
                    rows = todo[local.numpy()]
                    images = images.to(dev, non_blocking=True)
                bad = [j for j, e in enumerate(errors) if e]
                for j in bad:
                    if not skip_bad:
                        raise ImageError(errors[j])
                    skipped.append((paths[rows[j]], errors[j]))
                    ok[rows[j]] = False
                done += len(bad)
                launched = None
                if len(bad) < len(rows):
                    good = np.setdiff1d(np.arange(len(rows)), bad)
                    images = images if not bad else images[torch.from_numpy(good).to(dev)]
                    launched = _HostCopy(rows[good], forward(images))
                finish(pending)
                pending = launched
                if dev.type != "cuda":  # nothing to overlap on the CPU: store now, so a kill loses at most this batch
                    finish(pending)
                    pending = None
            finish(pending)
        finally:
            if store is not None:
                store.close()
    kept = np.flatnonzero(ok)
    for start in range(0, len(kept), 4096):  # compact in place (kept[j] >= j): no second copy of the descriptors
        chunk = kept[start:start + 4096]
        out[start:start + len(chunk)] = out[chunk]
    return Extraction(descriptors=out[:len(kept)], kept=kept, skipped=skipped, reused=reused)
