"""Safe image reading: header-only sizes, bad-file checks, and decoding to uint8 RGB/RGBA arrays.

Three costs, three functions:
* `scan_image` / `read_image_size` read only the file header (PIL parses headers lazily; pixels are
  never decoded) plus the last few bytes, and report the size after EXIF orientation or a reason
  the file is unusable. About 50-150 microseconds a file (CPU), so 100k files take 5-15 s.
* `verify_image_decodes` really decodes the file (JPEG at 1/8 scale: the whole compressed stream is
  still read, so truncation and corrupt data are found, at a fraction of the cost); this is the
  only reliable truncation test, and `check_image` runs it on every file, or in quick mode only on
  files whose end marker is missing.
* `load_image_rgb` / `load_image_rgba` decode to numpy with a defined conversion for every PIL mode.

Orientation: sizes and pixels both honour the EXIF/XMP orientation tag found in the header, so a
scanned size always equals the loaded array's size. (For PNG, an eXIf chunk placed after the pixel
data is ignored: reading it would need a full decode during the scan.)

Alpha: `load_image_rgb` drops alpha like sd-scripts' `convert("RGB")` (the colour stored under
transparent pixels is kept) unless a `background` colour is given to composite onto; alpha-mask
training reads the alpha with `load_image_rgba` / `load_image_with_alpha`.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError, features

from library.errors import UserError

# PIL refuses to open images above twice its MAX_IMAGE_PIXELS; our default limit is that point.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

_ORIENTATION_TAG = 0x0112
# EXIF orientation -> PIL transpose that makes the image upright (same table as ImageOps.exif_transpose).
_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# `info` keys from which PIL's getexif can take an orientation.
_ORIENTATION_SOURCES = ("exif", "xmp", "XML:com.adobe.xmp", "Raw profile type exif")
_TAIL_BYTES = 64
_PNG_END = b"IEND"
_JPEG_END = b"\xff\xd9"


def _image_extensions() -> list:
    """sd-scripts' list: png/jpg/jpeg/webp/bmp in both cases, plus avif/jxl when this PIL can read them."""
    exts = [".png", ".jpg", ".jpeg", ".webp", ".bmp"]
    if features.check("avif"):
        exts.append(".avif")
    try:
        import pillow_jxl  # noqa: F401  (registers the JPEG-XL plugin)
    except ImportError:
        pass
    Image.init()
    if ".jxl" in Image.registered_extensions():
        exts.append(".jxl")
    return exts + [e.upper() for e in exts]


IMAGE_EXTENSIONS = _image_extensions()


def is_image_file(path) -> bool:
    """True when the file name has one of IMAGE_EXTENSIONS (exact case, as sd-scripts)."""
    return os.path.splitext(str(path))[1] in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------------------------
# Header scan


@dataclass(frozen=True)
class ImageInfo:
    """What the header says about one file: its upright size, or why it cannot be used."""

    path: str
    size: Optional[tuple] = None  # (w, h) after EXIF orientation
    format: Optional[str] = None
    mode: Optional[str] = None
    reason: Optional[str] = None  # None when the header is fine
    tail_ok: bool = True  # the format's end marker is present (False hints at truncation)

    @property
    def ok(self) -> bool:
        return self.reason is None


class _BadImage(Exception):
    """Internal: the file is unusable; the message is the human reason."""


def _sniff_formats(head: bytes) -> Optional[list]:
    """PIL format to try first, from the magic bytes; None lets PIL try every plugin.

    Restricting Image.open to the right plugin makes a header scan ~7x faster.
    """
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ["PNG"]
    if head.startswith(b"\xff\xd8\xff"):
        return ["JPEG"]  # also yields MPO files
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ["WEBP"]
    if head[:2] == b"BM":
        return ["BMP"]
    if head[4:8] == b"ftyp" and "AVIF" in Image.OPEN:
        return ["AVIF"]
    return None


def _tail_ok(fmt: Optional[str], head: bytes, tail: bytes, file_size: int) -> bool:
    """Cheap truncation hint: PNG/JPEG end marker near the end of the file, WebP's RIFF length."""
    if fmt == "PNG":
        return _PNG_END in tail
    if fmt in ("JPEG", "MPO"):
        return _JPEG_END in tail
    if fmt == "WEBP":
        return file_size >= int.from_bytes(head[4:8], "little") + 8
    return True


def _check_riff_length(head: bytes, file_size: int) -> None:
    """A WebP shorter than its RIFF header says is cut off (PIL would only say "could not create decoder")."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        expected = int.from_bytes(head[4:8], "little") + 8
        if file_size < expected:
            raise _BadImage(f"truncated file: the RIFF header announces {expected} bytes, the file has {file_size}")


class _Opened:
    """An image with only its header read, and the end-marker hint (see `_tail_ok`)."""

    def __init__(self, image: Image.Image, tail_ok: bool):
        self.image = image
        self.tail_ok = tail_ok


@contextmanager
def _open_image(path, max_pixels: int) -> Iterator[_Opened]:
    """Open a file reading only its header (and last bytes); bad files raise _BadImage with a reason."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        if os.path.islink(path):
            raise _BadImage(f"broken symbolic link: its target {os.readlink(path)} does not exist") from None
        raise _BadImage("file not found") from None
    except IsADirectoryError:
        raise _BadImage("is a directory, not a file") from None
    except OSError as e:
        raise _BadImage(f"cannot read file ({e.strerror or e})") from None
    with f:
        head = f.read(32)
        file_size = f.seek(0, os.SEEK_END)
        if file_size == 0:
            raise _BadImage("empty file (0 bytes)")
        _check_riff_length(head, file_size)
        f.seek(max(0, file_size - _TAIL_BYTES))
        tail = f.read()
        f.seek(0)
        im = _pil_open(f, _sniff_formats(head), max_pixels)
        try:
            w, h = im.size
            if w <= 0 or h <= 0:
                raise _BadImage(f"invalid image size {w}x{h}")
            if w * h > max_pixels:
                raise _BadImage(f"decompression bomb: {w}x{h} = {w * h} pixels is more than the limit {max_pixels}")
            yield _Opened(im, _tail_ok(im.format, head, tail, file_size))
        finally:
            im.close()


def _pil_open(f, formats: Optional[list], max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Size is checked against our own limit afterwards; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(f, formats=formats)
    except Image.DecompressionBombError:
        raise _BadImage(f"decompression bomb: header claims more than {max_pixels} pixels") from None
    except UnidentifiedImageError:
        if formats is not None:
            raise _BadImage(f"corrupt {formats[0]} header (PIL cannot parse it)") from None
        raise _BadImage("not an image file PIL can read (wrong content for its extension?)") from None
    except Exception as e:  # PIL plugins raise many types (SyntaxError, struct.error, ...) on bad headers
        raise _BadImage(f"corrupt image header ({type(e).__name__}: {e})") from None


def _orientation(im: Image.Image) -> int:
    """EXIF (or XMP) orientation from the already-read header, 1 if absent or unreadable."""
    if not any(key in im.info for key in _ORIENTATION_SOURCES) and not hasattr(im, "tag_v2"):
        return 1  # skips PIL's EXIF machinery (a third of the scan time) for the common untagged file
    try:
        # The base-class getexif reads only what the header parse stored; PNG's override would decode.
        value = Image.Image.getexif(im).get(_ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF must not make an otherwise fine image unusable
        return 1
    return value if value in _TRANSPOSES else 1


def _upright_size(im: Image.Image) -> tuple:
    w, h = im.size
    return (h, w) if _orientation(im) in (5, 6, 7, 8) else (w, h)


def _size_reason(size: tuple, min_size) -> Optional[str]:
    """Reason when `size` is below `min_size` (int: both sides; (w, h): per side)."""
    if min_size is None:
        return None
    mw, mh = (min_size, min_size) if isinstance(min_size, (int, np.integer)) else min_size
    w, h = size
    if w < mw or h < mh:
        return f"too small: {w}x{h} is below the minimum {mw}x{mh} (smallest bucket)"
    return None


def scan_image(path, max_pixels: int = DEFAULT_MAX_PIXELS, min_size=None) -> ImageInfo:
    """Header-only check of one file: upright size or a reason; never decodes pixels."""
    path = str(path)
    try:
        with _open_image(path, max_pixels) as opened:
            im = opened.image
            size, fmt, mode, tail_ok = _upright_size(im), im.format, im.mode, opened.tail_ok
    except _BadImage as e:
        return ImageInfo(path, reason=str(e))
    except OSError as e:
        return ImageInfo(path, reason=f"cannot read file ({e.strerror or e})")
    return ImageInfo(path, size, fmt, mode, _size_reason(size, min_size), tail_ok)


def _scan_for_pool(args) -> ImageInfo:
    return scan_image(*args)


def scan_images(paths: Sequence, max_pixels: int = DEFAULT_MAX_PIXELS, min_size=None, num_workers: int = 1) -> list:
    """`scan_image` for many files, in order; `num_workers` > 1 spreads them over processes."""
    jobs = [(str(p), max_pixels, min_size) for p in paths]
    if num_workers <= 1 or len(jobs) < 512:
        return [_scan_for_pool(job) for job in jobs]
    with ProcessPoolExecutor(num_workers) as pool:
        return list(pool.map(_scan_for_pool, jobs, chunksize=256))


def read_image_size(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple:
    """(w, h) after EXIF orientation, from the header only; UserError for unusable files."""
    info = scan_image(path, max_pixels)
    if info.reason is not None:
        raise UserError(f"{path}: {info.reason}")
    return info.size


# --------------------------------------------------------------------------------------------
# Full checks


def verify_image_decodes(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Optional[str]:
    """Decode the whole file; a reason if it is truncated or corrupt, else None.

    PNG also goes through PIL's `verify()` (chunk CRCs up to IEND). JPEG is decoded at 1/8 scale via
    `draft()`: the entire entropy-coded stream is still parsed, so a cut file is still detected.
    """
    try:
        with _open_image(path, max_pixels) as opened:
            if opened.image.format == "PNG":
                opened.image.verify()
        with _open_image(path, max_pixels) as opened:
            im = opened.image
            if im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK"):
                im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
    except _BadImage as e:
        return str(e)
    except Exception as e:  # decoders report damage with OSError, SyntaxError, zlib.error, ...
        return _damage_reason(e)
    return None


def _damage_reason(error: Exception) -> str:
    text = str(error)
    if "truncated" in text.lower() or isinstance(error, EOFError):
        return f"truncated file ({text})"
    return f"corrupt image data ({type(error).__name__}: {text})"


def check_image(path, min_size=None, *, full: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> Optional[str]:
    """A human reason why the file cannot be used for training, or None.

    Checks: missing/empty file, not an image, corrupt header, more than `max_pixels` pixels,
    smaller than `min_size` (int or (w, h)), truncated or corrupt pixel data. `full=True` decodes
    every file; `full=False` decodes only files whose end marker is missing (header-speed, catches
    the common cut-off download but not damage in the middle of a file).
    """
    info = scan_image(path, max_pixels, min_size)
    if info.reason is not None:
        return info.reason
    if full or not info.tail_ok:
        return verify_image_decodes(path, max_pixels)
    return None


# --------------------------------------------------------------------------------------------
# Decoding


def _scale_16_to_8(values: np.ndarray) -> np.ndarray:
    """Round 0..65535 to 0..255 (65535 -> 255, 257 -> 1), never clipping at 255."""
    v = np.clip(values.astype(np.int64), 0, 65535)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def _colour_and_alpha(im: Image.Image) -> tuple:
    """(uint8 HxWx3 colour, uint8 HxW alpha or None) for any PIL mode."""
    mode = im.mode
    if mode == "P" and "transparency" in im.info or mode == "PA":
        im, mode = im.convert("RGBA"), "RGBA"
    elif mode in ("RGBa", "La"):  # premultiplied: un-premultiply through PIL
        im = im.convert("RGBA" if mode == "RGBa" else "LA")
        mode = im.mode
    if mode == "RGBA":
        a = np.asarray(im)
        return np.ascontiguousarray(a[..., :3]), np.ascontiguousarray(a[..., 3])
    if mode == "LA":
        a = np.asarray(im)
        return _gray_to_rgb(a[..., 0]), np.ascontiguousarray(a[..., 1])
    if mode.startswith("I;16") or mode == "I":
        # 16-bit sample range (16-bit PNG opens as I;16); PIL's own convert would clip at 255.
        return _gray_to_rgb(_scale_16_to_8(np.asarray(im))), None
    if mode == "F":
        # PIL's convention: float images use the 0..255 scale of "L".
        return _gray_to_rgb(np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8)), None
    if mode in ("L", "1"):
        return _gray_to_rgb(np.asarray(im.convert("L"))), None
    if mode != "RGB":
        try:
            im = im.convert("RGB")  # P, CMYK (Adobe-inverted handled by the JPEG plugin), YCbCr, RGBX, HSV
        except ValueError as e:
            raise _BadImage(f"unsupported image mode {mode} ({e}); convert it to RGB PNG or JPEG") from None
    return np.asarray(im), None


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(gray, dtype=np.uint8)[..., None], 3, axis=2)


def _decode(path, max_pixels: int) -> tuple:
    """(RGB, alpha or None) arrays, upright by the header orientation; UserError on any failure.

    Conversion happens while the file is open so the decoded PIL image is never copied.
    """
    try:
        with _open_image(path, max_pixels) as opened:
            im = opened.image
            orientation = _orientation(im)
            im.load()
            if orientation in _TRANSPOSES:
                im = im.transpose(_TRANSPOSES[orientation])
            rgb, alpha = _colour_and_alpha(im)
    except _BadImage as e:
        raise UserError(f"{path}: {e}") from None
    except Exception as e:  # see verify_image_decodes
        raise UserError(f"{path}: {_damage_reason(e)}; re-export or remove the file") from None
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    # Arrays viewing PIL's bytes are read-only; callers flip and augment in place.
    return (rgb if rgb.flags.writeable else rgb.copy()), alpha


def load_image_with_alpha(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple:
    """(uint8 HxWx3 RGB, uint8 HxW alpha or None when the image has no alpha), upright."""
    return _decode(path, max_pixels)


def load_image_rgb(path, background: Optional[tuple] = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """uint8 HxWx3 RGB, upright. Alpha is dropped (sd-scripts behaviour) or composited on `background`."""
    rgb, alpha = _decode(path, max_pixels)
    if background is None or alpha is None:
        return rgb
    a = alpha[..., None].astype(np.float32) / 255.0
    bg = np.asarray(background, dtype=np.float32).reshape(1, 1, 3)
    return np.rint(rgb * a + bg * (1.0 - a)).astype(np.uint8)


def load_image_rgba(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """uint8 HxWx4 RGBA, upright; alpha is 255 everywhere when the file has none."""
    rgb, alpha = _decode(path, max_pixels)
    if alpha is None:
        alpha = np.full(rgb.shape[:2], 255, dtype=np.uint8)
    return np.concatenate([rgb, alpha[..., None]], axis=2)
