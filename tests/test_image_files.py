"""Tests of library.data.image_files: header sizes, bad-file detection and mode conversions, on
scikit-image's bundled photos and hand-made broken files."""

import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps, features
from skimage import data

from library.errors import UserError
from library.data.image_files import (
    IMAGE_EXTENSIONS,
    check_image,
    is_image_file,
    load_image_rgb,
    load_image_rgba,
    load_image_with_alpha,
    read_image_size,
    scan_image,
    scan_images,
    verify_image_decodes,
)


def save(tmp_path, name, image, **kwargs):
    path = tmp_path / name
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path, **kwargs)
    return path


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_with_header_size(path, width, height):
    """A tiny PNG whose IHDR claims width x height (8-bit gray): a decompression-bomb header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))
    return path


def exif_with_orientation(value):
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


# ---------------------------------------------------------------- extensions and sizes


def test_image_extensions():
    for ext in [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP"]:
        assert ext in IMAGE_EXTENSIONS
    assert (".avif" in IMAGE_EXTENSIONS) == features.check("avif")
    assert ".gif" not in IMAGE_EXTENSIONS
    assert is_image_file("a/b.JPG") and not is_image_file("a/b.Jpg") and not is_image_file("a/b.txt")


@pytest.mark.parametrize("ext", ["png", "jpg", "webp", "bmp"])
def test_read_size_of_photos(tmp_path, ext):
    for name in ["astronaut", "chelsea", "coffee", "rocket", "camera"]:
        pixels = getattr(data, name)()
        path = save(tmp_path, f"{name}.{ext}", pixels)
        assert read_image_size(path) == (pixels.shape[1], pixels.shape[0])
        info = scan_image(path)
        assert info.ok and info.tail_ok and info.mode in ("RGB", "L")


def test_wrong_extension_still_read_by_content(tmp_path):
    path = save(tmp_path, "really_a_png.jpg", data.chelsea(), format="PNG")
    assert scan_image(path).format == "PNG" and read_image_size(path) == (451, 300)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_size_and_pixels(tmp_path, orientation):
    pixels = data.chelsea()  # 451 x 300, not square
    path = save(tmp_path, "o.jpg", pixels, exif=exif_with_orientation(orientation), quality=95)
    expected_size = (300, 451) if orientation >= 5 else (451, 300)
    assert read_image_size(path) == expected_size
    loaded = load_image_rgb(path)
    assert loaded.shape == (expected_size[1], expected_size[0], 3)
    with Image.open(path) as im:
        assert np.array_equal(loaded, np.asarray(ImageOps.exif_transpose(im).convert("RGB")))


def test_orientation_6_is_a_clockwise_turn(tmp_path):
    pixels = data.astronaut()[:, :300]
    path = save(tmp_path, "o6.png", pixels, exif=exif_with_orientation(6))
    assert read_image_size(path) == (512, 300)
    assert np.array_equal(load_image_rgb(path), np.rot90(pixels, k=-1))


# ---------------------------------------------------------------- bad files


def test_zero_byte_and_text_files(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture\n")
    assert "empty file" in check_image(empty)
    assert "not an image" in check_image(text)
    assert "not found" in check_image(tmp_path / "missing.jpg")
    with pytest.raises(UserError, match="empty.png: empty file"):
        read_image_size(empty)
    with pytest.raises(UserError, match="notes.png: not an image"):
        load_image_rgb(text)


@pytest.mark.parametrize("ext", ["jpg", "png", "webp"])
def test_truncated_files_detected_in_both_modes(tmp_path, ext):
    good = save(tmp_path, f"good.{ext}", data.astronaut())
    blob = good.read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(blob[: len(blob) * 2 // 3])
    assert check_image(good) is None and check_image(good, full=False) is None
    info = scan_image(cut)
    if ext == "webp":  # the RIFF length in the header already shows the cut
        assert info.reason.startswith("truncated file")
    else:  # header fine, missing end marker sends the quick check to a decode
        assert info.ok and info.size == (512, 512) and not info.tail_ok
    for full in (True, False):
        reason = check_image(cut, full=full)
        assert reason is not None and reason.startswith("truncated file"), reason
    with pytest.raises(UserError, match="cut"):
        load_image_rgb(cut)


def test_png_missing_end_chunk_and_bad_crc(tmp_path):
    blob = save(tmp_path, "ok.png", data.coffee()).read_bytes()
    no_end = tmp_path / "no_end.png"
    no_end.write_bytes(blob[:-12])
    assert "truncated" in check_image(no_end, full=False)
    damaged = bytearray(blob)
    damaged[len(blob) // 2] ^= 0xFF  # inside IDAT: CRC mismatch, end marker intact
    bad = tmp_path / "bad_crc.png"
    bad.write_bytes(bytes(damaged))
    assert scan_image(bad).ok  # the header scan cannot see this ...
    assert verify_image_decodes(bad) is not None  # ... the full check does
    assert check_image(bad) is not None


def test_decompression_bomb_headers(tmp_path):
    huge = png_with_header_size(tmp_path / "huge.png", 100_000, 100_000)
    reason = check_image(huge)
    assert reason.startswith("decompression bomb")
    with pytest.raises(UserError, match="decompression bomb"):
        read_image_size(huge)
    with pytest.raises(UserError, match="decompression bomb"):
        load_image_rgb(huge)
    # Below PIL's own refusal but above our limit: our check, from the header alone.
    big = png_with_header_size(tmp_path / "big.png", 3000, 2000)
    info = scan_image(big, max_pixels=5_000_000)
    assert info.reason == "decompression bomb: 3000x2000 = 6000000 pixels is more than the limit 5000000"
    assert scan_image(big).ok and scan_image(big).size == (3000, 2000)


def test_tiny_images_against_min_size(tmp_path):
    path = save(tmp_path, "tiny.png", data.camera()[:80, :100])
    assert "too small: 100x80" in check_image(path, min_size=256)
    assert check_image(path, min_size=(64, 64)) is None
    assert check_image(path, min_size=(128, 64)) is not None
    assert read_image_size(path) == (100, 80)
    one = save(tmp_path, "one.png", np.zeros((1, 1, 3), np.uint8))
    assert load_image_rgb(one).shape == (1, 1, 3)


def test_header_scan_does_not_decode(tmp_path):
    big = np.tile(data.astronaut(), (4, 4, 1))  # 2048 x 2048
    path = save(tmp_path, "big.jpg", big, quality=90)
    scan_image(path)
    start = time.perf_counter()
    for _ in range(200):
        assert scan_image(path).size == (2048, 2048)
    per_file = (time.perf_counter() - start) / 200
    assert per_file < 0.004, per_file  # a decode of this file takes ~30 ms


def test_scan_images_in_processes_matches_serial(tmp_path):
    paths = [save(tmp_path, "a.png", data.camera()), tmp_path / "missing.png"]
    paths += [save(tmp_path, f"c{i}.jpg", data.chelsea()[: 100 + i]) for i in range(3)]
    paths = paths * 120  # enough to use the pool
    serial = scan_images(paths)
    assert scan_images(paths, num_workers=2) == serial
    assert serial[2].size == (451, 100) and serial[1].reason == "file not found"


# ---------------------------------------------------------------- modes


def test_rgb_and_grayscale(tmp_path):
    rgb = data.astronaut()
    loaded = load_image_rgb(save(tmp_path, "rgb.png", rgb))
    assert np.array_equal(loaded, rgb) and loaded.flags.writeable and loaded.flags.c_contiguous
    gray = data.camera()
    loaded = load_image_rgb(save(tmp_path, "gray.png", gray))
    assert loaded.dtype == np.uint8 and loaded.shape == (512, 512, 3)
    assert all(np.array_equal(loaded[..., c], gray) for c in range(3))
    rgb_only, alpha = load_image_with_alpha(save(tmp_path, "gray2.png", gray))
    assert alpha is None and np.array_equal(rgb_only[..., 1], gray)
    bilevel = Image.fromarray(gray > 128)
    assert set(np.unique(load_image_rgb(save(tmp_path, "bw.png", bilevel)))) == {0, 255}


def test_rgba_alpha_dropped_composited_or_kept(tmp_path):
    rgb = data.coffee()[:64, :64]
    alpha = np.zeros((64, 64), np.uint8)
    alpha[:, 32:] = 255
    alpha[:, 16:32] = 128
    path = save(tmp_path, "rgba.png", np.dstack([rgb, alpha]))
    assert np.array_equal(load_image_rgb(path), rgb)  # sd-scripts' convert("RGB")
    white = load_image_rgb(path, background=(255, 255, 255))
    assert (white[:, :16] == 255).all() and np.array_equal(white[:, 32:], rgb[:, 32:])
    mid = np.rint(rgb[:, 16:32] * (128 / 255) + 255 * (127 / 255)).astype(np.uint8)
    assert np.abs(white[:, 16:32].astype(int) - mid).max() <= 1
    rgba = load_image_rgba(path)
    assert rgba.shape == (64, 64, 4) and np.array_equal(rgba[..., 3], alpha)
    assert (load_image_rgba(save(tmp_path, "no_alpha.png", rgb))[..., 3] == 255).all()


def test_gray_with_alpha(tmp_path):
    gray = data.camera()[:32, :32]
    alpha = np.full((32, 32), 7, np.uint8)
    path = save(tmp_path, "la.png", Image.fromarray(np.dstack([gray, alpha]), mode="LA"))
    rgb, a = load_image_with_alpha(path)
    assert np.array_equal(rgb[..., 2], gray) and np.array_equal(a, alpha)


def test_palette_with_transparency(tmp_path):
    im = Image.fromarray(data.chelsea()).quantize(16)
    index = np.asarray(im)
    transparent = int(index[0, 0])
    im.info["transparency"] = transparent
    path = save(tmp_path, "p.png", im, transparency=transparent)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    palette = np.array(im.getpalette()[: 3 * 16], np.uint8).reshape(16, 3)
    rgb, alpha = load_image_with_alpha(path)
    assert np.array_equal(rgb, palette[index])
    assert np.array_equal(alpha, np.where(index == transparent, 0, 255))
    assert np.array_equal(load_image_rgb(path), palette[index])


def test_palette_transparency_survives_exif_rotation(tmp_path):
    im = Image.fromarray(data.chelsea()).quantize(8)
    transparent = int(np.asarray(im)[0, 0])
    path = save(tmp_path, "p6.png", im, transparency=transparent, exif=exif_with_orientation(6))
    rgba = load_image_rgba(path)
    assert rgba.shape == (451, 300, 4)
    assert np.array_equal(rgba[..., 3] == 0, np.rot90(np.asarray(im) == transparent, k=-1))


def test_cmyk_jpeg(tmp_path):
    rgb = data.coffee()
    path = save(tmp_path, "cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=95)
    assert scan_image(path).mode == "CMYK"
    loaded = load_image_rgb(path)
    assert loaded.shape == rgb.shape
    assert np.abs(loaded.astype(int) - rgb).mean() < 4


def test_16_bit_grayscale_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32896, 65535, 65280]], np.uint16)
    path = save(tmp_path, "g16.png", Image.fromarray(values))
    assert scan_image(path).mode.startswith("I")
    loaded = load_image_rgb(path)
    assert loaded[0, :, 0].tolist() == [0, 1, 4, 128, 255, 254]
    ramp = (np.linspace(0, 65535, 512 * 8).reshape(8, 512)).astype(np.uint16)
    loaded = load_image_rgb(save(tmp_path, "ramp16.png", Image.fromarray(ramp)))
    assert np.abs(loaded[..., 0].astype(int) - ramp / 257).max() <= 0.5 + 1e-9


def test_int32_and_float_modes(tmp_path):
    ints = Image.fromarray(np.array([[0, 65535, 70000, -5, 32768]], np.int32))
    assert ints.mode == "I"
    assert load_image_rgb(save(tmp_path, "i.tif", ints))[0, :, 1].tolist() == [0, 255, 255, 0, 128]
    floats = Image.fromarray(np.array([[0.0, 127.6, 300.0, -5.0]], np.float32))
    assert floats.mode == "F"
    assert load_image_rgb(save(tmp_path, "f.tif", floats))[0, :, 0].tolist() == [0, 128, 255, 0]
