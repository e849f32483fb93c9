"""Image files as batches for a DataLoader, and JPEG decoding on a device (nvJPEG on CUDA).

`ImageFiles` decodes and resizes with PIL in the workers; `JpegFiles` hands plain JPEGs over as
raw bytes, which `decode_batch` decodes on the device and resizes there in same-size groups. A bad
file never raises inside a worker: its item carries the error text, and the caller decides.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from vpr.data.images import (
    EXIF_ORIENTATION, MAX_PIXELS, ImageItem, Preprocess, as_rgb, decode_bytes, image_name, load_rgb, preprocess,
    read_image_bytes,
)
from vpr.errors import ImageError, UsageError


def as_rule(rule: Preprocess | tuple[int, int]) -> Preprocess:
    """A preprocessing rule; an (H, W) pair means vpr's own fixed 8-bit bilinear resize."""
    return rule if isinstance(rule, Preprocess) else Preprocess("fixed", tuple(rule))


def content_key(path: Path, data: bytes) -> str:
    """What identifies an image's descriptor: its absolute path, size and a hash of its bytes, so a file
    whose content changes (even keeping its size and mtime, or swapped with another) is recomputed."""
    return f"{Path(path).resolve()}|{len(data)}|{hashlib.blake2b(data, digest_size=16).hexdigest()}"


def file_content_key(path: Path) -> str | None:
    """`content_key` of a file read now; None when it cannot be read (its error comes when it is decoded)."""
    try:
        return content_key(path, read_image_bytes(path))
    except ImageError:
        return None


class ImageFiles(Dataset):
    """Reads images as model inputs (uint8, or float for the "torch" resampler); a bad file yields its error text.

    Items of `paths` are files, or images in memory (`as_rgb` takes both; `names` names the latter in
    errors, and their errors are raised as they are). Dataset items are (image, index, error text, content key): the key (`content_key` of the bytes
    just decoded, "" for a bad file) is computed only when `keyed`. With a resize rule whose output depends
    on the image (shorter side, native), batch with `collate_sizes`, which keeps images of different sizes
    in separate groups.
    """

    def __init__(self, paths: list[ImageItem], rule: Preprocess | tuple[int, int], keyed: bool = False,
                 names: list[str] | None = None) -> None:
        self.paths = paths
        self.rule = as_rule(rule)
        self.keyed = keyed
        self.names = names

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str, str]:
        path = self.paths[i]
        if not isinstance(path, (str, os.PathLike)):  # an image in memory: its error, of its own kind, is the caller's
            name = self.names[i] if self.names is not None else image_name(path, i)
            return preprocess(as_rgb(path, name), self.rule, name), i, "", ""
        path = Path(path)
        try:
            if not self.keyed:
                return preprocess(load_rgb(path), self.rule, str(path)), i, "", ""
            data = read_image_bytes(path)
            return preprocess(decode_bytes(data, path), self.rule, str(path)), i, "", content_key(path, data)
        except ImageError as exc:
            return torch.zeros(3, *(self.rule.fixed_output or (1, 1)), dtype=torch.uint8), i, exc.args[0], ""


def same_size_groups(images: Sequence[torch.Tensor]) -> list[list[int]]:
    """Positions of `images` grouped by shape and dtype, in first-seen order: one stacked batch each."""
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault((tuple(image.shape), image.dtype), []).append(i)
    return list(groups.values())


def collate_sizes(batch: list[tuple[torch.Tensor, int, str, str]]) -> list[tuple[torch.Tensor, torch.Tensor, list[str], list[str]]]:
    """`ImageFiles` items as (images, indices, errors, keys) groups of one image size each, in first-seen order."""
    return [
        (torch.stack([batch[i][0] for i in rows]), torch.tensor([batch[i][1] for i in rows]), [batch[i][2] for i in rows],
         [batch[i][3] for i in rows])
        for rows in same_size_groups([item[0] for item in batch])
    ]


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

    Items are (tensor, is_jpeg_bytes, index, error text, content key): a 1-D uint8 byte tensor, or a
    3 x H x W uint8 image already at the input size; the key as `ImageFiles` gives it. Batch them
    with `collate_lists`.
    """

    def __init__(self, paths: list[Path], rule: Preprocess | tuple[int, int], keyed: bool = False) -> None:
        self.paths = paths
        self.rule = as_rule(rule)
        self.keyed = keyed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool, int, str, str]:
        path = self.paths[i]
        try:
            data = read_image_bytes(path)
            key = content_key(path, data) if self.keyed else ""
            if device_decodable(path):
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), True, i, "", key
            return preprocess(decode_bytes(data, path), self.rule, str(path)), False, i, "", key
        except ImageError as exc:
            return torch.zeros(0, dtype=torch.uint8), False, i, exc.args[0], ""


def collate_lists(batch: list[tuple]) -> tuple[list[torch.Tensor], list[bool], torch.Tensor, list[str], list[str]]:
    """`JpegFiles`' collate_fn: keep variable-size items (JPEG bytes) as lists."""
    data, is_jpeg, index, errors, keys = zip(*batch)
    return list(data), list(is_jpeg), torch.tensor(index), list(errors), list(keys)


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
    items: list[torch.Tensor], is_jpeg: list[bool], paths: list[Path], rule: Preprocess | tuple[int, int], device: torch.device,
) -> tuple[torch.Tensor, list[str]]:
    """Decode JPEG bytes on `device` and resize them there in same-size groups (antialiased, the
    rule's interpolation) to the rule's fixed output size.

    Returns an N x 3 x H x W float batch of 0..255 values on `device` and an error text per item
    ("" when fine); a JPEG the device decoder rejects is retried with PIL, which names the problem.
    """
    rule = as_rule(rule)
    input_size = rule.fixed_output
    if input_size is None:
        raise UsageError(f"decoding on the GPU needs a fixed input size, not '{rule.describe()}'; give a fixed `resize` (HEIGHTxWIDTH) or drop `decode_on_device`")
    height, width = input_size
    batch = torch.zeros(len(items), 3, height, width, device=device)
    errors = [""] * len(items)
    jpegs = [j for j, flag in enumerate(is_jpeg) if flag]
    decoded = _decode_jpegs([items[j] for j in jpegs], device) if jpegs else []
    groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    for j, image in zip(jpegs, decoded):
        if image is None:
            try:
                batch[j] = preprocess(load_rgb(paths[j]), rule, str(paths[j])).to(device)
            except ImageError as exc:
                errors[j] = exc.args[0]
            continue
        groups.setdefault(tuple(image.shape[1:]), []).append((j, image))
    for size, members in groups.items():
        stack = torch.stack([image for _, image in members]).float()
        if size != (height, width):
            stack = torch.nn.functional.interpolate(stack, size=input_size, mode=rule.interpolation, antialias=True, align_corners=False)
        batch[[j for j, _ in members]] = stack if rule.resampler == "torch" else stack.round_().clamp_(0, 255)
    for j, flag in enumerate(is_jpeg):
        if not flag and items[j].dim() == 3:
            batch[j] = items[j].to(device, non_blocking=True)
    return batch, errors
