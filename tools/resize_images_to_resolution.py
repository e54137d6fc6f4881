"""Downscale the images of a folder to one or more target areas, keeping their aspect ratio.

    python tools/resize_images_to_resolution.py SRC DST --max_resolution 512x512,384x384 [--divisible_by 8]

Every image larger than a target area W×H is scaled by sqrt(W·H / (w·h)) (smaller ones are kept
at their size), its sides floored to a multiple of --divisible_by by a centre crop, and saved as
`<stem>+<WxH>.jpg` (or .png); each size is made from the original. Other files are copied as they
are; with --copy_associated_files, `<stem>.*` files (captions...) are also copied once per size as
`<stem>+<WxH><ext>`. Subfolders are left alone. Every file is written atomically.
"""

import argparse
import glob
import logging
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run  # noqa: E402
from library.errors import UserError  # noqa: E402

logger = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FILTERS = {"area": "BOX", "box": "BOX", "cubic": "BICUBIC", "lanczos4": "LANCZOS", "nearest": "NEAREST",
           "linear": "BILINEAR"}


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src_img_folder", type=str, help="folder with the images")
    p.add_argument("dst_img_folder", type=str, help="folder the resized images are written to")
    p.add_argument("--max_resolution", type=str, default="512x512,384x384,256x256,128x128",
                   help='target sizes "WxH,WxH,..." (only the area W·H counts)')
    p.add_argument("--divisible_by", type=int, default=1, help="floor both sides to a multiple of this (default 1)")
    p.add_argument("--interpolation", type=str, choices=list(FILTERS), default=None,
                   help="resampling filter (default area: the average of the covered pixels)")
    p.add_argument("--save_as_png", action="store_true", help="save PNG instead of JPEG (quality 100)")
    p.add_argument("--copy_associated_files", action="store_true",
                   help="copy <stem>.* files (captions etc.) once per size as <stem>+<WxH><ext>")
    return p


def parse_resolutions(text: str) -> list:
    out = []
    for item in (s.strip() for s in text.split(",")):
        w, sep, h = item.partition("x")
        if not sep or not w.strip().isdigit() or not h.strip().isdigit() or int(w) < 1 or int(h) < 1:
            raise UserError(f"--max_resolution: {item!r} is not WxH (e.g. 512x512)")
        out.append((item, int(w) * int(h)))
    return out


def resized(image, area: int, divisible_by: int, resample):
    """The image scaled down to at most `area` pixels, sides floored to `divisible_by` by a centre crop."""
    w, h = image.size
    if w * h > area:
        scale = math.sqrt(area / (w * h))
        w, h = max(1, int(w * scale)), max(1, int(h * scale))
        image = image.resize((w, h), resample)
    new_w = w - w % divisible_by if w >= divisible_by else w
    new_h = h - h % divisible_by if h >= divisible_by else h
    left, top = (w - new_w) // 2, (h - new_h) // 2
    return image.crop((left, top, left + new_w, top + new_h)) if (new_w, new_h) != (w, h) else image


def _copy(src: str, dst: str) -> None:
    from library.models.safetensors_io import atomic_path

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def main(argv=None):
    args = setup_parser().parse_args(argv)
    from PIL import Image

    from library.models.safetensors_io import atomic_path

    if not os.path.isdir(args.src_img_folder):
        raise UserError(f"{args.src_img_folder}: no such folder")
    if args.divisible_by < 1:
        raise UserError("--divisible_by: must be at least 1")
    if os.path.abspath(args.src_img_folder) == os.path.abspath(args.dst_img_folder):
        raise UserError(f"{args.dst_img_folder}: is the source folder; choose another folder for the output")
    resolutions = parse_resolutions(args.max_resolution)
    resample = getattr(Image.Resampling, FILTERS[args.interpolation or "area"])
    os.makedirs(args.dst_img_folder, exist_ok=True)
    for name in sorted(os.listdir(args.src_img_folder)):
        path = os.path.join(args.src_img_folder, name)
        if os.path.isdir(path):
            logger.info("skipped folder %s", path)
            continue
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS:
            _copy(path, os.path.join(args.dst_img_folder, name))
            continue
        with Image.open(path) as image:
            image = image.convert("RGB")
            for label, area in resolutions:
                out = resized(image, area, args.divisible_by, resample)
                target = os.path.join(args.dst_img_folder, f"{stem}+{label}{'.png' if args.save_as_png else '.jpg'}")
                with atomic_path(target, suffix=os.path.splitext(target)[1]) as tmp:
                    out.save(tmp, quality=100)
                logger.info("%s -> %s (%dx%d)", name, os.path.basename(target), *out.size)
        if args.copy_associated_files:
            for other in glob.glob(os.path.join(glob.escape(args.src_img_folder), glob.escape(stem) + ".*")):
                other_ext = os.path.splitext(other)[1]
                if other_ext.lower() in IMAGE_EXTENSIONS:
                    continue
                for label, _ in resolutions:
                    _copy(other, os.path.join(args.dst_img_folder, f"{stem}+{label}{other_ext}"))


if __name__ == "__main__":
    run(main)
