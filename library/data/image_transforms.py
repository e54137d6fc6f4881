"""From an image file and its `CropPlan` to the pixels a model sees.

One function does resize (the plan's `resize_interpolation`; by default area when shrinking and
Lanczos when enlarging, as sd-scripts' cv2 calls do), crop at the plan's real offsets and optional
horizontal flip. The training dataset,
the latent cache and the cache tools all call it, so a cached latent and a freshly encoded one come
from identical pixels. Conditioning images (loss masks, ControlNet-LLLite hints) take the same path
with their target image's plan and flip.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

from library.data.bucketing import CropPlan
from library.data.image_files import load_image_rgb, load_image_with_alpha


# sd-scripts' `resize_interpolation` names → PIL filters. sd-scripts resizes with OpenCV except for
# lanczos and box; PIL's filters compute the same kernels. OpenCV's "area" averages pixel areas when
# shrinking (PIL's BOX) and, as OpenCV documents, behaves like nearest-neighbour when enlarging.
_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR, "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX,
}


def resize_filter(interpolation: Optional[str], shrinking: bool):
    """The PIL filter of a `resize_interpolation` value (None: area when shrinking, else Lanczos)."""
    if interpolation is None:
        return Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
    if interpolation == "area":
        return Image.Resampling.BOX if shrinking else Image.Resampling.NEAREST
    return _FILTERS[interpolation]


def _resize(array: np.ndarray, size: tuple, interpolation: Optional[str] = None) -> np.ndarray:
    h, w = array.shape[:2]
    if (w, h) == tuple(size):
        return array
    resample = resize_filter(interpolation, shrinking=size[0] * size[1] < w * h)
    mode = "L" if array.ndim == 2 else None
    return np.asarray(Image.fromarray(array, mode=mode).resize(tuple(size), resample=resample))


def crop_resized(array: np.ndarray, plan: CropPlan, flip: bool = False) -> np.ndarray:
    """Resize a (H, W[, C]) uint8 array to the plan's size, crop the bucket, optionally flip."""
    array = _resize(array, plan.resized_size, plan.interpolation)
    left, top, right, bottom = plan.crop_ltrb
    array = array[top:bottom, left:right]
    if flip:
        array = array[:, ::-1]
    return np.require(array, requirements=["C", "W"])  # torch.from_numpy wants writable memory


def training_pixels_u8(path: str, plan: CropPlan, flip: bool = False):
    """uint8 tensor (3, H, W): the pixels `training_pixels` scales (what a cache stores exactly)."""
    import torch

    return torch.from_numpy(crop_resized(load_image_rgb(path), plan, flip)).permute(2, 0, 1)


def unit_range(pixels_u8):
    """uint8 (..., H, W) → float in [-1, 1], the VAE's (and ControlNet hints') input range."""
    return pixels_u8.float().div_(127.5).sub_(1.0)


def training_pixels(path: str, plan: CropPlan, flip: bool = False):
    """Float tensor (3, H, W) in [-1, 1], the VAE's input range."""
    return unit_range(training_pixels_u8(path, plan, flip))


def training_pixels_and_alpha(path: str, plan: CropPlan, flip: bool = False, want_alpha: bool = False):
    """(pixels (3,H,W) in [-1,1], alpha mask (H,W) in [0,1] or None) for masked-loss training."""
    import torch

    if not want_alpha:
        return training_pixels(path, plan, flip), None
    rgb, alpha = load_image_with_alpha(path)
    pixels = torch.from_numpy(crop_resized(rgb, plan, flip)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    mask: Optional[torch.Tensor] = None
    if alpha is not None:
        mask = torch.from_numpy(crop_resized(alpha, plan, flip)).float().div_(255.0)
    else:
        mask = torch.ones(pixels.shape[1:], dtype=torch.float32)
    return pixels, mask
