"""Tests of library.data.bucketing against the worked numbers of spec/bucketing.md and a scalar
transcription of sd-scripts' assignment rules."""

import math
import random
import time
import tracemalloc
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from skimage import data

from library.data.bucketing import (
    BucketAssigner,
    BucketSettings,
    bucket_info,
    centre_crops,
    count_batches,
    kohya_crop_ltrb,
    make_bucket_resolutions,
    make_epoch_batches,
    parse_resolution,
    plan_crop,
    plan_crop_for,
    sample_rng,
    sdxl_size_conditioning,
)
from library.errors import UserError
from library.data.image_files import read_image_size

SPEC_17 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]


def assigner(resolution="512", **flags):
    defaults = dict(enable_bucket=True, min_bucket_reso=256, max_bucket_reso=1024, bucket_reso_steps=64)
    defaults.update(flags)
    return BucketAssigner(BucketSettings.from_flags(resolution, **defaults))


# ---------------------------------------------------------------- bucket lists and flags


def test_bucket_list_512_matches_spec():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == SPEC_17


def test_bucket_list_sdxl_1024():
    buckets = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert len(buckets) == 41
    for b in [(832, 1216), (896, 1152), (960, 1088), (1024, 1024), (1216, 832)]:
        assert b in buckets
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert buckets == sorted(buckets)


def test_bucket_list_steps_32_and_rectangular_resolution():
    buckets = make_bucket_resolutions((768, 512), 256, 1024, 32)
    assert (608, 608) in buckets  # floor(sqrt(393216) / 32) * 32
    assert all(w % 32 == 0 and h % 32 == 0 and w * h <= 768 * 512 for w, h in buckets)
    assert all((h, w) in buckets for w, h in buckets)


def test_parse_resolution():
    assert parse_resolution("512") == (512, 512)
    assert parse_resolution("768,512") == (768, 512)
    assert parse_resolution(640) == (640, 640)
    assert parse_resolution([1024, 768]) == (1024, 768)
    for bad in ["", "a", "512,512,512", "0", "-512"]:
        with pytest.raises(UserError, match="--resolution"):
            parse_resolution(bad)


def test_min_max_rounded_to_steps_and_checked():
    s = BucketSettings.from_flags("512", enable_bucket=True, min_bucket_reso=200, max_bucket_reso=1000, bucket_reso_steps=64)
    assert (s.min_bucket_reso, s.max_bucket_reso) == (192, 1024)
    with pytest.raises(UserError, match="--min_bucket_reso"):
        BucketSettings.from_flags("512", enable_bucket=True, min_bucket_reso=576)
    with pytest.raises(UserError, match="--max_bucket_reso"):
        BucketSettings.from_flags("1024,512", enable_bucket=True, max_bucket_reso=768)
    # Without bucketing the min/max flags play no role and bucket_no_upscale is off.
    s = BucketSettings.from_flags("512", enable_bucket=False, min_bucket_reso=576, bucket_no_upscale=True)
    assert s.predefined_buckets() == [(512, 512)] and not s.bucket_no_upscale


# ---------------------------------------------------------------- spec worked examples


def test_worked_example_portrait_512():
    a = assigner("512")
    got = a.select(1000, 1500)
    assert got.bucket == (384, 640) and got.resized == (427, 640)
    assert got.ar_error == pytest.approx(0.6 - 1000 / 1500)
    plan = plan_crop_for((1000, 1500), got)
    assert (plan.left, plan.top) == (21, 0)
    assert plan.crop_ltrb == (21, 0, 405, 640)
    assert plan.sdxl_size_conditioning() == (1500, 1000, 0, 21, 640, 384)
    # sd-scripts' letterbox numbers for the same image, kept for reading its caches.
    assert kohya_crop_ltrb((384, 640), (1000, 1500)) == (0, 32, 384, 608)


def test_worked_example_landscape_512():
    got = assigner("512").select(1920, 1080)
    assert got.bucket == (640, 384) and got.resized == (683, 384)
    assert got.ar_error == pytest.approx(640 / 384 - 1920 / 1080)
    plan = plan_crop_for((1920, 1080), got)
    assert (plan.left, plan.top) == (21, 0)
    assert plan.flipped_left() == 683 - 21 - 640
    assert plan.sdxl_size_conditioning(flipped=True) == (1080, 1920, 0, 22, 384, 640)
    assert kohya_crop_ltrb((640, 384), (1920, 1080)) == (0, 12, 640, 372)


def test_worked_example_sdxl():
    got = assigner("1024", max_bucket_reso=2048).select(1000, 1500)
    assert got.bucket == (832, 1216) and got.resized == (832, 1248)
    plan = plan_crop_for((1000, 1500), got)
    assert (plan.left, plan.top) == (0, 16)
    assert plan.sdxl_size_conditioning() == (1500, 1000, 16, 0, 1216, 832)
    left, top, right, bottom = kohya_crop_ltrb((832, 1216), (1000, 1500))
    assert (left, top, bottom) == (10, 0, 1216) and right == pytest.approx(820.6667, abs=1e-3)
    assert int(832 - right) == 11  # sd-scripts' flipped left


def test_worked_example_no_upscale():
    a = assigner("512", bucket_no_upscale=True)
    got = a.select(1000, 1500)
    assert got.bucket == (384, 576) and got.resized == (384, 576)
    assert a.buckets is None
    small = a.select(300, 200)  # below max area: no resize, floor to steps, crop only
    assert small.bucket == (256, 192) and small.resized == (300, 200)
    plan = plan_crop_for((300, 200), small)
    assert (plan.left, plan.top) == (22, 4)


def test_sdxl_size_conditioning_order():
    assert sdxl_size_conditioning((1000, 1500), (16, 3), (832, 1216)) == (1500, 1000, 16, 3, 1216, 832)
    assert all(type(v) is int for v in sdxl_size_conditioning((np.int64(4), 5), (0, 0), (8, 8)))


def test_exact_bucket_size_and_float_ties():
    a = assigner("512")
    assert a.select(640, 384).resized == (640, 384)
    # Same AR as (640, 384) but not an exact bucket: still that bucket, scaled.
    assert a.select(1280, 768) == ((640, 384), (640, 384), 0.0)
    # Distances to two buckets are bit-identical floats: the first in sorted order wins (numpy argmin).
    assert a.select(93, 135).bucket == (384, 640)
    assert a.select(81, 273).bucket == (256, 832)
    assert assigner("1024", max_bucket_reso=2048).select(64, 68).bucket == (960, 1088)


def test_fixed_resolution_mode_resizes_then_crops():
    a = assigner("512", enable_bucket=False)
    assert a.buckets == [(512, 512)]
    got = a.select(1000, 1500)
    assert got.bucket == (512, 512) and got.resized == (512, 768)
    assert plan_crop_for((1000, 1500), got)[3:5] == (0, 128)
    up = a.select(300, 200)  # smaller images are upscaled (cover) instead of failing
    assert up.resized == (768, 512)
    assert plan_crop_for((300, 200), up)[3:5] == (128, 0)
    wide = assigner("768,512", enable_bucket=False).select(768, 512)
    assert wide == ((768, 512), (768, 512), 0.0)


def test_no_upscale_image_smaller_than_steps():
    a = assigner("512", bucket_no_upscale=True)
    with pytest.raises(UserError, match="bucket_reso_steps"):
        a.select(40, 1000, name="tiny.png")
    result = a.assign([40, 300], [1000, 200])
    assert result.valid.tolist() == [False, True]


# ---------------------------------------------------------------- sd-scripts reference


def reference_select(settings, buckets, iw, ih):
    """Scalar transcription of sd-scripts' BucketManager.select_bucket (spec/bucketing.md §2)."""
    ar = iw / ih
    if not settings.bucket_no_upscale:
        if (iw, ih) in buckets:
            reso = (iw, ih)
        else:
            reso = buckets[int(np.abs(np.array([w / h for w, h in buckets]) - ar).argmin())]
        scale = reso[1] / ih if ar > reso[0] / reso[1] else reso[0] / iw
        resized = (int(iw * scale + 0.5), int(ih * scale + 0.5))
    else:
        d, area = settings.bucket_reso_steps, settings.max_area

        def rts(x):
            x = int(x + 0.5)
            return x - x % d

        if iw * ih > area:
            rw = math.sqrt(area * ar)
            rh = area / rw
            bw1 = rts(rw)
            h1 = rts(bw1 / ar)
            bh2 = rts(rh)
            w2 = rts(bh2 * ar)
            if abs(bw1 / h1 - ar) < abs(w2 / bh2 - ar):
                resized = (bw1, int(bw1 / ar + 0.5))
            else:
                resized = (int(bh2 * ar + 0.5), bh2)
        else:
            resized = (iw, ih)
        reso = (resized[0] - resized[0] % d, resized[1] - resized[1] % d)
    return reso, resized, reso[0] / reso[1] - ar


@pytest.mark.parametrize(
    "resolution,flags",
    [
        ("512", {}),
        ("768,512", {"bucket_reso_steps": 32}),
        ("1024", {"max_bucket_reso": 2048}),
        ("1024", {"max_bucket_reso": 2048, "bucket_no_upscale": True}),
        ("512", {"bucket_no_upscale": True, "bucket_reso_steps": 32}),
        ("640,448", {"enable_bucket": False}),
    ],
)
def test_vectorised_assignment_equals_reference(resolution, flags):
    a = assigner(resolution, **flags)
    rng = np.random.default_rng(1)
    w = rng.integers(200, 5000, 3000)
    h = rng.integers(200, 5000, 3000)
    if a.buckets:  # exact-size and same-AR images exercise the exact-match path
        w[:len(a.buckets)] = [b[0] for b in a.buckets]
        h[:len(a.buckets)] = [b[1] for b in a.buckets]
        w[-20:], h[-20:] = w[:20] * 3, h[:20] * 3
    result = a.assign(w, h)
    for i in range(len(w)):
        bucket, resized, err = reference_select(a.settings, a.buckets, int(w[i]), int(h[i]))
        assert result[i].bucket == bucket and result[i].resized == resized, (w[i], h[i])
        assert result[i].ar_error == err
    assert (result.resized_w >= result.bucket_w).all() and (result.resized_h >= result.bucket_h).all()


# ---------------------------------------------------------------- crops


def test_random_crop_uses_generator_like_sd_scripts():
    plan = plan_crop((1000, 1500), (700, 900), (512, 768), rng=random.Random(7))
    ref = random.Random(7)
    assert (plan.left, plan.top) == (ref.randint(0, 188), ref.randint(0, 132))
    # Only the height has excess: exactly one draw, and it is the top offset.
    rng = random.Random(3)
    plan = plan_crop((10, 20), (512, 900), (512, 768), rng=rng)
    ref = random.Random(3)
    assert plan.left == 0 and plan.top == ref.randint(0, 132)
    assert rng.random() == ref.random()


def test_random_crop_offsets_cover_range_and_feed_conditioning():
    offsets = {plan_crop((0, 0), (600, 512), (512, 512), rng=random.Random(s)).left for s in range(400)}
    assert min(offsets) >= 0 and max(offsets) <= 88 and len(offsets) > 60
    plan = plan_crop((1200, 1024), (600, 512), (512, 512), rng=random.Random(5))
    assert plan.sdxl_size_conditioning() == (1024, 1200, 0, plan.left, 512, 512)
    assert plan.sdxl_size_conditioning(flipped=True)[3] == 88 - plan.left
    with pytest.raises(ValueError):
        plan_crop((1, 1), (500, 500), (512, 512))


def test_centre_crops_vectorised():
    result = assigner("512").assign([1000, 1920, 512], [1500, 1080, 512])
    left, top = centre_crops(result)
    assert left.tolist() == [21, 21, 0] and top.tolist() == [0, 0, 0]


def test_sample_rng_is_a_pure_function():
    assert sample_rng(42, 3, 17).random() == sample_rng(42, 3, 17).random()
    values = {sample_rng(42, e, i).random() for e in range(3) for i in range(3)}
    assert len(values) == 9


# ---------------------------------------------------------------- batches


def test_batches_never_mix_buckets_and_keep_repeats():
    resolutions = [(384, 640), (512, 512)]
    bucket_index = [0, 0, 0, 1, 1]
    repeats = [2, 2, 2, 1, 1]
    eb = make_epoch_batches(resolutions, bucket_index, repeats, 2, seed=11, epoch=1)
    assert len(eb) == count_batches(bucket_index, repeats, 2) == 4
    seen = Counter()
    for batch in eb:
        assert {bucket_index[i] for i in batch.items} == {batch.bucket_index}
        assert batch.resolution == resolutions[batch.bucket_index]
        assert all(type(i) is int for i in batch.items)
        seen.update(batch.items)
    assert seen == Counter({0: 2, 1: 2, 2: 2, 3: 1, 4: 1})


def test_last_batch_of_bucket_is_short():
    eb = make_epoch_batches([(512, 512)], [0] * 5, [1] * 5, 2, seed=0, epoch=0)
    assert sorted(len(b.items) for b in eb) == [1, 2, 2]


def test_shuffle_is_deterministic_per_seed_and_epoch():
    rng = np.random.default_rng(0)
    bucket_index = rng.integers(0, 6, 400)
    resolutions = [(64 * (i + 1), 64) for i in range(6)]

    def listing(seed, epoch):
        return [(b.bucket_index, b.items) for b in make_epoch_batches(resolutions, bucket_index, [1] * 400, 4, seed, epoch)]

    assert listing(5, 2) == listing(5, 2)  # resume: (seed, epoch) alone defines the epoch
    assert listing(5, 2) != listing(5, 3)
    assert listing(5, 2) != listing(6, 2)
    assert listing(5, 3) == listing(6, 2)  # seed + epoch, as sd-scripts
    # Every epoch still holds every entry once.
    assert sorted(i for _, items in listing(5, 3) for i in items) == list(range(400))


def test_bucket_info_metadata():
    a = assigner("512")
    result = a.assign([1000, 1920, 1001, 512], [1500, 1080, 1500, 512])
    info = bucket_info(result, [3, 1, 1, 2])
    assert info["buckets"] == {
        0: {"resolution": (384, 640), "count": 4},
        1: {"resolution": (512, 512), "count": 2},
        2: {"resolution": (640, 384), "count": 1},
    }
    expected = np.mean([abs(0.6 - 1000 / 1500), abs(640 / 384 - 1920 / 1080), abs(0.6 - 1001 / 1500), 0.0])
    assert info["mean_img_ar_error"] == pytest.approx(expected)


def test_one_million_entries_fast_and_small():
    rng = np.random.default_rng(0)
    n = 1_000_000
    w, h = rng.integers(64, 6000, n), rng.integers(64, 6000, n)
    tracemalloc.start()
    start = time.process_time()
    for flags in ({"bucket_reso_steps": 32}, {"bucket_no_upscale": True}):
        result = assigner("1024", max_bucket_reso=2048, **flags).assign(w, h)
        resolutions, index = result.bucket_table()
        eb = make_epoch_batches(resolutions, index, np.ones(n, np.int64), 4, seed=1, epoch=1)
        assert len(eb) >= n // 4 and len(eb[len(eb) - 1].items) >= 1
    elapsed = time.process_time() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 30 and peak < 2 * 2**30, (elapsed, peak)


# ---------------------------------------------------------------- real photos


def _save(tmp_path, name, array, size=None):
    im = Image.fromarray(array)
    if size is not None:
        im = im.resize(size, Image.Resampling.BILINEAR)
    path = tmp_path / name
    im.save(path)
    return path


def test_photo_files_assigned_like_spec(tmp_path):
    cases = [
        # file, pixels, (w, h) to write or None, bucket, resized, (left, top)
        ("rocket.jpg", data.rocket(), None, (640, 384), (640, 427), (0, 21)),
        ("chelsea.png", data.chelsea(), None, (640, 384), (640, 426), (0, 21)),
        ("coffee.webp", data.coffee(), None, (640, 384), (640, 427), (0, 21)),
        ("astronaut.bmp", data.astronaut(), None, (512, 512), (512, 512), (0, 0)),
        ("camera.png", data.camera(), None, (512, 512), (512, 512), (0, 0)),
        ("portrait.jpg", data.astronaut(), (1000, 1500), (384, 640), (427, 640), (21, 0)),
        ("landscape.png", data.coffee(), (1920, 1080), (640, 384), (683, 384), (21, 0)),
    ]
    a = assigner("512")
    for name, pixels, size, bucket, resized, offsets in cases:
        path = _save(tmp_path, name, pixels, size)
        wh = read_image_size(path)
        assert wh == (size or (pixels.shape[1], pixels.shape[0]))
        got = a.select(*wh)
        assert (got.bucket, got.resized) == (bucket, resized), name
        assert plan_crop_for(wh, got)[3:5] == offsets, name
