"""Every kind of image file a user may have: read upright as RGB, or a one-line error naming it."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

from vpr.data.images import Preprocess, load_rgb, preprocess
from vpr.errors import ImageError


def _save(path, image, **kwargs):
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize(
    "mode,make",
    [
        ("L", lambda: Image.new("L", (30, 20), 128)),
        ("RGBA", lambda: Image.new("RGBA", (30, 20), (255, 0, 0, 128))),
        ("P", lambda: Image.new("RGB", (30, 20), (0, 255, 0)).convert("P", palette=Image.ADAPTIVE)),
        ("I;16", lambda: Image.fromarray(np.full((20, 30), 65535, dtype=np.uint16))),
        ("LA", lambda: Image.new("LA", (30, 20), (200, 255))),
    ],
)
def test_any_png_mode_loads_as_8bit_rgb(tmp_path, mode, make):
    img = load_rgb(_save(tmp_path / f"{mode.replace(';', '')}.png", make()))
    assert img.mode == "RGB" and img.size == (30, 20)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    img = load_rgb(_save(tmp_path / "a.png", Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))))
    assert np.asarray(img)[0, 0].tolist() == [128, 128, 128]


def test_exif_rotated_photo_is_turned_upright(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = _save(tmp_path / "rot.jpg", image, exif=exif.tobytes())
    assert load_rgb(path).size == (20, 40)


def test_tiny_and_wide_images_resize_to_the_model_input(tmp_path):
    for size in ((1, 1), (4000, 3)):
        img = load_rgb(_save(tmp_path / f"{size[0]}.png", Image.new("RGB", size, (9, 9, 9))))
        assert preprocess(img, Preprocess("fixed", (48, 64))).shape == (3, 48, 64)


def test_truncated_jpeg_is_an_image_error(tmp_path):
    full = _save(tmp_path / "full.jpg", Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[:800])
    with pytest.raises(ImageError, match=r"cut\.jpg: corrupt or truncated"):
        load_rgb(cut)


@pytest.mark.parametrize(
    "name,content,message",
    [("empty.jpg", b"", "empty file"), ("text.jpg", b"hello, I am not a JPEG", "not an image"), ("gone.jpg", None, "not found")],
)
def test_broken_files_give_one_line_errors_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError, match=message) as info:
        load_rgb(path)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("vpr.data.images.MAX_PIXELS", 100)
    with pytest.raises(ImageError, match="too large"):
        load_rgb(_save(tmp_path / "big.png", Image.new("RGB", (20, 20))))


GRADIENT = np.tile(np.arange(256, dtype=np.int64), (3, 1))  # 3 x 256, values 0..255


@pytest.mark.parametrize(
    "name,values",
    [
        ("int32_0_255", GRADIENT.astype(np.int32)),
        ("float32_0_255", GRADIENT.astype(np.float32)),
        ("float32_0_1", (GRADIENT / 255.0).astype(np.float32)),
        ("uint16_full_range", (GRADIENT * 257).astype(np.uint16)),
        ("int32_16bit_range", (GRADIENT * 257).astype(np.int32)),
        ("int32_wide_range", (GRADIENT * 100_000).astype(np.int32)),
    ],
)
def test_deep_tiffs_scale_like_the_8bit_image(tmp_path, name, values):
    path = _save(tmp_path / f"{name}.tif", Image.fromarray(values))
    eight_bit = np.asarray(load_rgb(_save(tmp_path / "u8.tif", Image.fromarray(GRADIENT.astype(np.uint8)))))
    deep = np.asarray(load_rgb(path))
    assert deep.shape == eight_bit.shape == (3, 256, 3)
    assert np.abs(deep.astype(int) - eight_bit.astype(int)).max() <= 1


def test_float_tiff_with_nan_and_negative_values_loads(tmp_path):
    values = np.array([[np.nan, -5.0, 0.5, 1.0]], dtype=np.float32)
    assert np.asarray(load_rgb(_save(tmp_path / "f.tif", Image.fromarray(values))))[0, :, 0].tolist() == [0, 0, 128, 255]


def test_directory_given_as_an_image_says_so(tmp_path):
    (tmp_path / "photos.jpg").mkdir()
    with pytest.raises(ImageError) as info:
        load_rgb(tmp_path / "photos.jpg")
    assert str(info.value) == f"{tmp_path / 'photos.jpg'}: is a directory, not an image file; give image files"


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks and FIFOs")
def test_symlink_loops_broken_links_and_pipes_say_what_they_are(tmp_path):
    loop = tmp_path / "loop.jpg"
    os.symlink(loop.name, loop)
    with pytest.raises(ImageError, match=r"loop\.jpg: symlink loop"):
        load_rgb(loop)
    broken = tmp_path / "broken.jpg"
    os.symlink(tmp_path / "gone.jpg", broken)
    with pytest.raises(ImageError, match=r"broken\.jpg: broken symlink to .*gone\.jpg; fix or remove the link"):
        load_rgb(broken)
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(ImageError, match=r"pipe\.jpg: not a regular file"):
        load_rgb(tmp_path / "pipe.jpg")


def test_path_with_a_nul_character_is_an_image_error():
    with pytest.raises(ImageError, match="NUL"):
        load_rgb("a\0b.jpg")
