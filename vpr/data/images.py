"""Image loading and preprocessing shared by training, indexing and querying.

Every image becomes RGB (grayscale, RGBA, 16-bit and palette files included), is turned upright
by its EXIF orientation, resized to the model's input size and normalised.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from vpr.data.frames import split_frame
from vpr.errors import ImageError, ImageTooLarge, NotAnImage, UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
EXIF_ORIENTATION = 0x0112
MAX_PIXELS = 178_956_970  # PIL's decompression-bomb limit (2x its warning threshold)


def load_rgb(path: Path) -> Image.Image:
    """Open an image as an upright 8-bit RGB PIL image, or raise `ImageError` naming the file."""
    path = Path(path)
    frame = split_frame(path)
    if frame is not None:
        return _frame(*frame)
    _check_file(path)
    return decode_rgb(path, str(path), advice=BAD_FILE_ADVICE)


BAD_FILE_ADVICE = "; re-copy or remove it, or build with `skip_bad`"


def _frame(video: Path, seconds: float) -> Image.Image:
    """A video frame (`vpr.data.frames`), decoded by `vpr.data.video`."""
    from vpr.data.video import read_frame

    return read_frame(video, seconds)


def read_image_bytes(path: Path) -> bytes:
    """The bytes of an image file (checked as `load_rgb` checks it), for decoding and content keys alike; a video
    frame's are its pixels as an uncompressed BMP."""
    path = Path(path)
    frame = split_frame(path)
    if frame is not None:
        buffer = io.BytesIO()
        _frame(*frame).save(buffer, format="BMP")
        return buffer.getvalue()
    _check_file(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot be read ({exc.strerror}){BAD_FILE_ADVICE}") from None


def decode_bytes(data: bytes, path: Path) -> Image.Image:
    """`read_image_bytes`' result as `load_rgb` would decode the file."""
    return decode_rgb(io.BytesIO(data), str(path), advice=BAD_FILE_ADVICE)


def decode_rgb(source: Path | BinaryIO, name: str, max_pixels: int | None = None, advice: str = "",
               draft: int | None = None) -> Image.Image:
    """An image file (a path or open bytes) as an upright 8-bit RGB PIL image. Raises `NotAnImage`,
    `ImageTooLarge` (over `max_pixels`, default `MAX_PIXELS`) or `ImageError` (corrupt), naming `name`
    and ending with `advice`. With `draft`, a JPEG is decoded at the smallest scale whose sides are at
    least `draft` pixels (for thumbnails)."""
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if img.width * img.height > max_pixels:
                    raise ImageTooLarge(f"{name}: image too large ({img.width}x{img.height} pixels is over the limit "
                                        f"of {max_pixels:,}); downscale it")
                if draft is not None and img.format == "JPEG":
                    img.draft("RGB", (draft, draft))
                img.load()
                return upright_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"{name}: image too large ({exc}); downscale it") from exc
    except UnidentifiedImageError as exc:
        raise NotAnImage(f"{name}: not an image file PIL can read (JPEG, PNG, WebP, BMP or TIFF expected){advice}") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{name}: corrupt or truncated image ({str(exc)[:100]}){advice}") from exc


def load_thumbnail(path: Path, size: int) -> Image.Image:
    """An upright RGB thumbnail (longest side `size`) of an image file; a JPEG is decoded at the smallest
    scale still at least `size` (PIL's draft mode), so a 24-megapixel photo costs a fraction of its memory."""
    path = Path(path)
    frame = split_frame(path)
    if frame is None:
        _check_file(path)
    thumb = _frame(*frame) if frame is not None else decode_rgb(path, str(path), draft=size)
    thumb.thumbnail((size, size))
    return thumb


ImageItem = Union[str, os.PathLike, Image.Image, np.ndarray, bytes]  # a file, or an image in memory


def decode_image(data: bytes, name: str = "image", max_pixels: int | None = None) -> Image.Image:
    """The bytes of an image file (an upload) as an upright 8-bit RGB image, as `load_rgb` reads files.

    Raises `NotAnImage` for unrecognised bytes, `ImageTooLarge` above `max_pixels`, `ImageError` when corrupt.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UsageError(f"{name}: decode_image takes the bytes of an image file, not a {type(data).__name__}")
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    return decode_rgb(io.BytesIO(bytes(data)), name, max_pixels)


def as_rgb(image: ImageItem, name: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Any image vpr takes (a path, a PIL image, an H x W x 3 or H x W uint8 array, the bytes of a file) as an
    upright 8-bit RGB PIL image; a wrong kind of input is a `UsageError` naming `name`."""
    if isinstance(image, (str, os.PathLike)):
        return load_rgb(Path(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), name, max_pixels)
    if isinstance(image, Image.Image):
        if image.width * image.height > max_pixels:
            raise ImageTooLarge(f"{name}: {image.width}x{image.height} pixels is over the limit of {max_pixels:,}")
        return upright_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise UsageError(f"{name}: arrays must be H x W x 3 (RGB) or H x W uint8, got {image.shape} {image.dtype}")
        if image.shape[0] * image.shape[1] > max_pixels or min(image.shape[:2]) == 0:
            raise ImageTooLarge(f"{name}: {image.shape[1]}x{image.shape[0]} pixels is empty or over the limit of {max_pixels:,}")
        return to_rgb(Image.fromarray(np.ascontiguousarray(image)))
    raise UsageError(f"{name}: a {type(image).__name__} is not an image; give a path, PIL image, uint8 array or file bytes")


def image_name(image: ImageItem, i: int) -> str:
    """What errors and results call the `i`-th image: its path, a PIL image's file name, else 'image i'."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return getattr(image, "filename", "") or f"image {i}"


def image_list(images_: object) -> list:
    """One image or a sequence of them, as a list."""
    single = isinstance(images_, (str, os.PathLike, Image.Image, bytes, bytearray, memoryview)) or (
        type(images_).__name__ == "ndarray" and images_.ndim in (2, 3))
    if single:
        return [images_]
    if not isinstance(images_, Sequence) and type(images_).__name__ != "ndarray":
        raise UsageError(f"images: a {type(images_).__name__} is not an image or a list of images; give paths, PIL images, "
                         "uint8 arrays or file bytes")
    return list(images_)


def upright_rgb(img: Image.Image) -> Image.Image:
    """Turn an image upright by its EXIF orientation and convert it to 8-bit RGB."""
    upright = ImageOps.exif_transpose(img) if img.getexif().get(EXIF_ORIENTATION, 1) != 1 else img
    return to_rgb(upright)


def _check_file(path: Path) -> None:
    """Raise `ImageError` unless `path` is a non-empty regular file (following symlinks)."""
    try:
        info = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageError(f"{path}: symlink loop (the link leads back to itself); fix or remove the link") from None
        if os.path.islink(path):
            raise ImageError(f"{path}: broken symlink to {os.readlink(path)}; fix or remove the link") from None
        raise ImageError(f"{path}: image not found; check the path") from None
    except ValueError:  # a NUL character in the path
        raise ImageError(f"{str(path)!r}: image not found (the path holds a NUL character); check the path") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{path}: is a directory, not an image file; give image files")
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{path}: not a regular file (a pipe, socket or device); give image files")
    if info.st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes); re-copy or remove it")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on black.

    Integer and float grey images are scaled to 0..255 by this rule: 16-bit modes (`I;16*`) map
    65535 to 255; 32-bit `I`/`F` images whose maximum is at most 255 are taken as 8-bit values, an
    `F` image whose maximum is at most 1.0 is scaled by 255, and larger ranges map max(maximum, 65535)
    to 255. Negative values and NaN become 0.
    """
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        array = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(array.max(initial=0.0))
        if img.mode.startswith("I;16"):
            scale = 255.0 / 65535.0
        elif img.mode == "F" and peak <= 1.0:
            scale = 255.0
        elif peak <= 255.0:
            scale = 1.0
        else:
            scale = 255.0 / max(peak, 65535.0)
        img = Image.fromarray(np.rint(np.clip(array * scale, 0, 255)).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation every ImageNet-trained backbone expects
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("fixed", "shorter", "native")
INTERPOLATIONS = ("bilinear", "bicubic")
RESAMPLERS = ("pil", "torch")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input: a resize rule, then optionally sides to multiples of `multiple`.

    `resize`: "fixed" (to `size` = (H, W)), "shorter" (shorter side to `size[0]`, the long side to
    int(S * long / short), keeping the aspect ratio as torchvision does) or "native" (no resize).
    `multiple` > 1 then resizes each side to round(side / multiple) * multiple (the DINOv2 rule, a
    second resize as the reference tools do it). `resampler` "pil" resizes 8-bit images with PIL;
    "torch" resizes float pixels with `F.interpolate(antialias=True)`, as torchvision's tensor
    `Resize` does after `ToTensor`/`Normalize` (the published DINOv2-era models' pipeline).
    """

    resize: str = "fixed"
    size: tuple[int, int] = (240, 320)
    multiple: int = 1
    interpolation: str = "bilinear"
    resampler: str = "pil"

    def first_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) after the resize rule, for an image of `height` x `width`."""
        if self.resize == "fixed":
            return tuple(self.size)
        if self.resize == "shorter":
            short, long = sorted((height, width))
            side = self.size[0]
            scaled = int(side * long / short)
            return (side, scaled) if height <= width else (scaled, side)
        return height, width

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) of the model input for an image of `height` x `width`."""
        h, w = self.first_size(height, width)
        if self.multiple > 1:
            h, w = (max(self.multiple, round(h / self.multiple) * self.multiple),
                    max(self.multiple, round(w / self.multiple) * self.multiple))
        return h, w

    @property
    def fixed_output(self) -> tuple[int, int] | None:
        """The model input size when it does not depend on the image (a fixed resize), else None."""
        return self.output_size(*self.size) if self.resize == "fixed" else None

    def describe(self) -> str:
        """'322x322', 'shorter side 480', 'native' (+ ', sides to multiples of 14'), for tables and help."""
        text = {"fixed": f"{self.size[0]}x{self.size[1]}", "shorter": f"shorter side {self.size[0]}",
                "native": "native"}[self.resize]
        return text + (f", sides to multiples of {self.multiple}" if self.multiple > 1 else "")


def _resize_pil(img: Image.Image, size: tuple[int, int], interpolation: str) -> Image.Image:
    """`img` at (H, W) `size` with PIL (antialiased), unchanged when already that size."""
    height, width = size
    if img.size == (width, height):
        return img
    return img.resize((width, height), Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR)


def _resize_float(pixels: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """A float 3 x h x w image at (H, W) `size` as torchvision's tensor Resize(antialias=True) computes it."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    return F.interpolate(pixels[None], size=size, mode=interpolation, align_corners=False, antialias=True)[0]


MAX_INPUT_PIXELS = 1 << 24  # the model input (after the resize rule): 4096 x 4096; a ViT's time grows with its square
MAX_ASPECT = 64.0  # the model input's long side over its short side (a 360-degree strip is about 8)


def check_input_size(rule: Preprocess, height: int, width: int, name: str,
                     max_pixels: int = MAX_INPUT_PIXELS, max_aspect: float = MAX_ASPECT) -> tuple[int, int]:
    """The model input size of a `height` x `width` image under `rule`, or `ImageTooLarge` when it would hold
    more than `max_pixels` or be longer than `max_aspect` times its width (a 200000 x 1 strip at shorter side
    16 is 16 x 3.2 million pixels); checked before any resize, so such an image costs nothing."""
    first = rule.first_size(height, width)
    out_h, out_w = rule.output_size(height, width)
    longest = max(first[0], first[1], out_h, out_w)
    if max(first[0] * first[1], out_h * out_w) > max_pixels or longest > max_aspect * max(1, min(out_h, out_w)):
        raise ImageTooLarge(
            f"{name}: {width}x{height} pixels becomes a {out_w}x{out_h} model input ({rule.describe()}), over "
            f"{max_pixels:,} pixels or an aspect ratio of {max_aspect:g}; crop or downscale it, or use a fixed resize"
        )
    return out_h, out_w


def preprocess(img: Image.Image, rule: Preprocess, name: str = "image", max_pixels: int = MAX_INPUT_PIXELS) -> torch.Tensor:
    """A PIL RGB image as a 3 x H x W model input of 0..255 values: uint8 ("pil") or float32 ("torch"); an
    image whose input would be over `max_pixels` or too elongated is refused (`check_input_size`)."""
    check_input_size(rule, img.height, img.width, getattr(img, "filename", "") or name, max_pixels)
    first = rule.first_size(img.height, img.width)
    final = rule.output_size(img.height, img.width)
    if rule.resampler == "pil":
        img = _resize_pil(_resize_pil(img, first, rule.interpolation), final, rule.interpolation)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return _resize_float(_resize_float(pixels, first, rule.interpolation), final, rule.interpolation)


def normalize_batch(batch: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float normalised, done once per batch (on whichever device holds it)."""
    mean_t = torch.tensor(mean, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std_t = torch.tensor(std, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return (batch.float() - mean_t) / std_t

