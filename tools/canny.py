"""Canny edge maps, the hint images of a canny ControlNet-LLLite, as sd-scripts' tools/canny.py.

    python tools/canny.py --input photo.jpg --output photo_canny.png [--thres1 32] [--thres2 224]
    python tools/canny.py --input data/img --output data/canny     # every image of a folder

The image is read upright (EXIF orientation applied, as training reads it), turned to grey and
passed to OpenCV's `Canny` (3x3 Sobel aperture, L1 gradient, hysteresis thresholds --thres1 <
--thres2): white edges on black, one channel, the image's size. With a folder, each image becomes
`<output>/<same base name>.png`, the pairing `conditioning_data_dir` expects; existing files are
replaced atomically. See docs/controlnet-lllite.md for making a whole conditioning dataset.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run  # noqa: E402
from library.errors import UserError  # noqa: E402


def canny_edges(path: str, thres1: int, thres2: int):
    """uint8 (H, W) edge map of an image file: 255 on edges, 0 elsewhere."""
    try:
        import cv2
    except ImportError:
        raise UserError("tools/canny.py needs OpenCV: pip install opencv-python-headless") from None
    from library.data.image_files import load_image_rgb

    return cv2.Canny(cv2.cvtColor(load_image_rgb(path), cv2.COLOR_RGB2GRAY), thres1, thres2)


def save_png(array, path: str) -> None:
    from PIL import Image

    from library.models.safetensors_io import atomic_path

    with atomic_path(path, ".png") as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def pairs(source: str, target: str) -> list:
    """(image, edge map file) pairs: one file, or every image of a folder → <target>/<stem>.png."""
    if os.path.isfile(source):
        return [(source, target)]
    if not os.path.isdir(source):
        raise UserError(f"--input {source}: no such file or folder")
    from library.data.sources import list_images

    images = list_images(source)
    if not images:
        raise UserError(f"--input {source}: the folder holds no images")
    if os.path.isfile(target):
        raise UserError(f"--output {target}: is a file; give a folder for a folder of images")
    stems = [os.path.splitext(os.path.basename(p))[0] for p in images]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise UserError(f"--input {source}: images share a base name ({', '.join(twice[:3])}); their edge maps "
                        "would overwrite each other")
    return [(p, os.path.join(target, stem + ".png")) for p, stem in zip(images, stems)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=str, default=None, help="image file, or folder of images")
    p.add_argument("--output", type=str, default=None, help="edge map file (.png), or folder for a folder")
    p.add_argument("--thres1", type=int, default=32, help="lower hysteresis threshold (default 32)")
    p.add_argument("--thres2", type=int, default=224, help="upper hysteresis threshold (default 224)")
    args = p.parse_args(argv)
    if not args.input or not args.output:
        raise UserError("--input and --output are required")
    if not 0 <= args.thres1 <= args.thres2:
        raise UserError(f"--thres1 {args.thres1} --thres2 {args.thres2}: need 0 <= thres1 <= thres2")
    todo = pairs(args.input, args.output)
    for image, target in todo:
        save_png(canny_edges(image, args.thres1, args.thres2), target)
    print(f"{len(todo)} edge map(s) written" + (f" to {args.output}" if len(todo) > 1 else f": {todo[0][1]}"))
    return 0


if __name__ == "__main__":
    run(main)
