"""resize_interpolation (dataset config, subset config, --resize_interpolation): every training resize of
images, masks and conditioning images uses the chosen PIL filter, and latent caches key on it."""

import argparse

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from library.data.bucketing import CropPlan
from library.data.check import scan_from_args
from library.data.image_transforms import crop_resized, resize_filter
from library.data.train_dataset import TrainDataset
from library.models.families import SD1


def _write(folder, names):
    folder.mkdir(parents=True)
    for name in names:
        Image.fromarray(getattr(skimage.data, name)()[..., :3]).resize((100, 80)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(name, encoding="utf-8")


@pytest.fixture
def two_subsets(tmp_path):
    _write(tmp_path / "a", ["astronaut"])
    _write(tmp_path / "b", ["chelsea"])
    config = tmp_path / "dataset.toml"
    config.write_text(f"""
[general]
resolution = 64
caption_extension = ".txt"

[[datasets]]
resize_interpolation = "nearest"

  [[datasets.subsets]]
  image_dir = "{(tmp_path / 'a').as_posix()}"

  [[datasets.subsets]]
  image_dir = "{(tmp_path / 'b').as_posix()}"
  resize_interpolation = "bilinear"
""", encoding="utf-8")
    return tmp_path, str(config)


def _scan(config):
    from tools.check_dataset import build_parser  # the dataset flags as the check tool reads them

    return scan_from_args(build_parser().parse_args(["--dataset_config", config]), SD1)


@pytest.mark.parametrize("name, shrinking, expected", [
    (None, True, Image.Resampling.BOX), (None, False, Image.Resampling.LANCZOS),
    ("area", True, Image.Resampling.BOX), ("area", False, Image.Resampling.NEAREST),
    ("lanczos", True, Image.Resampling.LANCZOS), ("nearest", False, Image.Resampling.NEAREST),
    ("linear", True, Image.Resampling.BILINEAR), ("bilinear", False, Image.Resampling.BILINEAR),
    ("cubic", True, Image.Resampling.BICUBIC), ("bicubic", False, Image.Resampling.BICUBIC),
    ("box", False, Image.Resampling.BOX),
])
def test_every_spec_name_has_its_filter(name, shrinking, expected):
    assert resize_filter(name, shrinking) == expected


def test_subset_and_dataset_values_choose_the_filter_of_every_sample(two_subsets):
    root, config = two_subsets
    dataset = TrainDataset(_scan(config), SD1, seed=0)
    seen = {}
    for index in range(len(dataset)):
        out = dataset.load_batch(_one(dataset, index), 1, 0)
        plan = out["samples"][0].plan
        name = dataset.sample_path(index)
        source = Image.open(name).convert("RGB")
        expected_filter = Image.Resampling.NEAREST if "/a/" in name else Image.Resampling.BILINEAR
        resized = np.asarray(source.resize(plan.resized_size, resample=expected_filter))
        left, top, right, bottom = plan.crop_ltrb
        expected = torch.from_numpy(np.ascontiguousarray(resized[top:bottom, left:right])).permute(2, 0, 1)
        got = ((out["images"][0] + 1) * 127.5).round().to(torch.uint8)
        assert torch.equal(got, expected), name
        seen[plan.interpolation] = name
    assert set(seen) == {"nearest", "bilinear"}


def _one(dataset, index):
    from library.data import bucketing

    bucket = dataset.resolutions[0]
    return bucketing.Batch(0, bucket, [index])


def test_masks_and_hints_take_the_same_filter():
    mask = np.zeros((80, 100), np.uint8)
    mask[:, ::2] = 255  # stripes: nearest keeps 0/255, any smoothing filter makes greys
    plan = CropPlan((100, 80), (80, 64), (64, 64), 8, 0, "nearest")
    assert set(np.unique(crop_resized(mask, plan))) <= {0, 255}
    smooth = crop_resized(mask, plan._replace(interpolation="bilinear"))
    assert len(np.unique(smooth)) > 2


def test_latent_cache_keys_and_the_cache_tools_use_it(two_subsets):
    from library.caching.latent_cache import LatentCache, LatentSample
    from library.caching.tools import collect_cache_items
    from library.data.config import load_dataset_config
    from library.models.random_models import build_random_models

    root, config = two_subsets
    cache = LatentCache(build_random_models(SD1, "tiny", 0).vae, SD1)
    path = str(root / "a" / "astronaut.png")
    plan = CropPlan((100, 80), (80, 64), (64, 64), 8, 0)
    keys = {cache.key(LatentSample(path, plan._replace(interpolation=i))) for i in (None, "nearest", "bilinear")}
    assert len(keys) == 3
    items = collect_cache_items(load_dataset_config(config, argparse.Namespace(cache_latents=True)))
    assert sorted(item.plan.interpolation for item in items) == ["bilinear", "nearest"]
