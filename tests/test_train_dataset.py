"""Tests of library.data.scan and library.data.train_dataset on scikit-image photos and hand-made bad files:
bad-file detection, skipping, bucketed batches, determinism, batch contents for SD1/SDXL, captions,
masks, conditioning images, cache hooks."""

import argparse
import logging
import os
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from library.data import bucketing, flags as dataset_flags
from library.data.check import add_dataset_check_arguments, scan_from_args
from library.data.config import load_dataset_config
from library.data.scan import scan_dataset
from library.errors import UserError
from library.models.families import SD1, SDXL
from library.text.tokenizer import load_tokenizer
from library.data.train_dataset import (
    SampleDescriptor,
    TrainDataset,
    color_augment,
    face_crop_plan,
    face_info_from_name,
)

BAD_NAMES = {"cut.jpg", "empty.png", "notes.png", "link.png", "bomb.png"}


# ---------------------------------------------------------------- fixtures


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_bomb_png(path, width=20000, height=20000):
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    payload = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + payload)


def photo(name, scale=0.5):
    """A scikit-image photo, halved to keep decoding fast."""
    pixels = getattr(data, name)()
    image = Image.fromarray(pixels)
    return image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.BOX)


def make_mixed_folder(folder):
    """Good photos in several aspect ratios and modes, plus every kind of bad file."""
    folder.mkdir(parents=True)
    photo("astronaut").save(folder / "astronaut.jpg", quality=90)  # 256x256
    photo("chelsea", 1.0).save(folder / "chelsea.png")  # 451x300
    photo("coffee").save(folder / "coffee.jpg", quality=90)  # 300x200
    photo("rocket").transpose(Image.Transpose.ROTATE_90).save(folder / "rocket.png")  # 213x320, portrait
    photo("camera").save(folder / "camera_gray.png")  # mode L
    photo("chelsea", 1.0).convert("CMYK").save(folder / "cmyk.jpg")
    wide16 = (np.asarray(photo("camera"), dtype=np.uint16) * 257)
    Image.fromarray(wide16).save(folder / "sixteen.png")
    palette = photo("coffee").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(folder / "palette.png", transparency=0)
    for name, caption in [("astronaut", "an astronaut, portrait"), ("chelsea", "a cat"), ("coffee", "a cup of coffee"),
                          ("rocket", "a rocket"), ("camera_gray", "a photographer"), ("cmyk", "cmyk cat"),
                          ("sixteen", "sixteen bit"), ("palette", "palette coffee")]:
        (folder / f"{name}.txt").write_text(caption, encoding="utf-8")
    # bad files
    jpeg = (folder / "coffee.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("these are my notes, not an image")
    os.symlink("moved-away.png", folder / "link.png")  # a broken symbolic link
    write_bomb_png(folder / "bomb.png")
    # a good image whose caption file is not UTF-8, and one without any caption
    photo("astronaut").save(folder / "latin1.png")
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    photo("coffee").save(folder / "nocaption.jpg", quality=90)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Data loading runs in single-threaded workers; on a 2-core machine torch's thread pool makes these
    # small per-image tensor ops ~50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    make_mixed_folder(root / "img" / "2_sks thing")
    return root / "img"


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    folder = root / "img" / "3_sks"
    folder.mkdir(parents=True)
    for name in ("astronaut", "coffee", "rocket"):
        photo(name).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"{name}, photo, sharp, colorful", encoding="utf-8")
    photo("chelsea", 1.0).save(folder / "chelsea.jpg", quality=90)
    (folder / "chelsea.txt").write_text("chelsea, cat, orange, whiskers", encoding="utf-8")
    return root / "img"


@pytest.fixture(scope="module")
def tokenizers():
    clip_l = load_tokenizer(SD1.text_encoders[0])  # SDXL's first tokenizer is the same
    return {"sd1": [clip_l], "sdxl": [clip_l, load_tokenizer(SDXL.text_encoders[1])]}


def parse(argv):
    p = argparse.ArgumentParser()
    dataset_flags.add_dataset_arguments(p)
    dataset_flags.add_config_arguments(p)
    add_dataset_check_arguments(p)
    p.add_argument("--train_batch_size", type=int, default=1)
    p.add_argument("--prior_loss_weight", type=float, default=1.0)
    p.add_argument("--masked_loss", action="store_true")
    return p.parse_args(argv)


BUCKET_FLAGS = ["--resolution", "256", "--enable_bucket", "--min_bucket_reso", "128", "--max_bucket_reso", "512",
                "--caption_extension", ".txt"]


def scan_dir(folder, *extra, family=SD1):
    return scan_from_args(parse(["--train_data_dir", str(folder), *BUCKET_FLAGS, *extra]), family)


# ---------------------------------------------------------------- scanning


def test_scan_reports_exactly_the_bad_files(mixed_dir):
    scan = scan_dir(mixed_dir)
    by_name = {os.path.basename(b.path): b.reason for b in scan.bad_files}
    assert set(by_name) == BAD_NAMES | {"latin1.txt"}
    assert "truncated" in by_name["cut.jpg"]
    assert "empty file" in by_name["empty.png"]
    assert "not an image" in by_name["notes.png"]
    assert by_name["link.png"] == "broken symbolic link: its target moved-away.png does not exist"
    assert "decompression bomb" in by_name["bomb.png"]
    assert "not UTF-8" in by_name["latin1.txt"] and "0xe9" in by_name["latin1.txt"]
    latin = next(b for b in scan.bad_files if b.path.endswith("latin1.txt"))
    assert latin.image.endswith("latin1.png")  # the image is dropped with its unreadable caption

    usable = {os.path.basename(i.path) for i in scan.datasets[0].train}
    assert usable == {"astronaut.jpg", "chelsea.png", "coffee.jpg", "rocket.png", "camera_gray.png", "cmyk.jpg",
                      "sixteen.png", "palette.png", "nocaption.jpg"}
    assert [os.path.basename(p) for p in scan.missing_captions] == ["nocaption.jpg"]
    assert not scan.ok and not scan.errors
    buckets = {os.path.basename(i.path): i.bucket for i in scan.datasets[0].train}
    assert buckets["astronaut.jpg"] == (256, 256) and buckets["chelsea.png"] == (320, 192)
    assert buckets["rocket.png"] == (192, 320)  # portrait


def test_raise_for_problems_lists_everything_and_names_the_flag(mixed_dir):
    with pytest.raises(UserError) as info:
        scan_dir(mixed_dir).raise_for_problems()
    message = str(info.value)
    assert message.startswith("6 bad file(s)") and "--skip_bad_images" in message and "\n" not in message
    for name in BAD_NAMES | {"latin1.txt"}:
        assert name in message


def test_skip_bad_images_drops_them_with_one_warning(mixed_dir, caplog):
    scan = scan_dir(mixed_dir, "--skip_bad_images")
    assert scan.ok
    with caplog.at_level(logging.WARNING):
        scan.raise_for_problems()
    warnings = [r.getMessage() for r in caplog.records if "--skip_bad_images" in r.getMessage()]
    assert len(warnings) == 1 and "6 bad file(s)" in warnings[0] and "bomb.png" in warnings[0]
    dataset = TrainDataset(scan, SD1, seed=1)
    paths = {os.path.basename(dataset.sample_path(i)) for i in range(len(dataset))}
    assert len(paths) == 9 and not paths & BAD_NAMES and "latin1.png" not in paths


def test_bad_files_stop_the_dataset_unless_skipped(mixed_dir):
    with pytest.raises(UserError, match="bad file"):
        TrainDataset(scan_dir(mixed_dir), SD1, seed=0)


def test_full_check_finds_damage_in_the_middle(tmp_path):
    folder = tmp_path / "img" / "1_x"
    folder.mkdir(parents=True)
    photo("astronaut").save(folder / "ok.png")
    photo("coffee").save(folder / "damaged.png")
    raw = bytearray((folder / "damaged.png").read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(64)  # end marker intact, pixel data broken
    (folder / "damaged.png").write_bytes(bytes(raw))
    quick = scan_dir(tmp_path / "img")
    assert quick.bad_files == []
    full = scan_dir(tmp_path / "img", "--full_image_check")
    assert [os.path.basename(b.path) for b in full.bad_files] == ["damaged.png"]


def test_small_images_are_upscaled_into_their_bucket_as_sd_scripts(tmp_path, caplog):
    """sd-scripts' select_bucket cover-scales any image into the bucket of its aspect ratio (bucketing.md
    §2.1): 448x172 -> bucket 768x320 (resized 833x320), 200x200 -> 512x512; one warning lists them."""
    folder = tmp_path / "img" / "1_x"
    folder.mkdir(parents=True)
    photo("coffee").resize((448, 172)).save(folder / "strip.png")
    photo("astronaut").resize((200, 200)).save(folder / "square.png")
    photo("chelsea", 1.0).resize((1024, 680)).save(folder / "big.png")
    base = ["--train_data_dir", str(tmp_path / "img"), "--resolution", "512", "--caption_extension", ".txt"]
    with caplog.at_level(logging.WARNING):
        scan = scan_from_args(parse(base + ["--enable_bucket"]))
    assert scan.bad_files == [] and scan.ok
    got = {os.path.basename(i.path): (i.bucket, i.resized) for i in scan.datasets[0].train}
    assert got["strip.png"] == ((768, 320), (833, 320))
    assert got["square.png"] == ((512, 512), (512, 512))
    warnings = [r.getMessage() for r in caplog.records if "smaller than their bucket" in r.getMessage()]
    assert len(warnings) == 1 and "2 image(s)" in warnings[0]
    assert "strip.png 448x172 -> 833x320" in warnings[0] and "square.png 200x200 -> 512x512" in warnings[0]
    assert "big.png" not in warnings[0]
    dataset = TrainDataset(scan, SD1, seed=0)
    shapes = {}
    for batch in dataset.epoch_batches(1):
        out = dataset.load_batch(batch, 1, 0)
        shapes.update({os.path.basename(p): tuple(im.shape) for p, im in zip(out["image_paths"], out["images"])})
    assert shapes["strip.png"] == (3, 320, 768) and shapes["square.png"] == (3, 512, 512)

    # without bucketing the one bucket is the resolution: small images are upscaled into it too
    no_buckets = scan_from_args(parse(base))
    assert no_buckets.bad_files == [] and {i.bucket for i in no_buckets.datasets[0].train} == {(512, 512)}


def test_bucket_no_upscale_keeps_sizes_and_names_what_no_bucket_holds(tmp_path):
    """--bucket_no_upscale (bucketing.md §2.2): small images keep their size, floored to the steps; a side
    under --bucket_reso_steps leaves an empty bucket, a bad file naming the settings, never a crash."""
    folder = tmp_path / "img" / "1_x"
    folder.mkdir(parents=True)
    photo("coffee").resize((448, 172)).save(folder / "strip.png")
    photo("astronaut").resize((200, 200)).save(folder / "square.png")
    photo("rocket").resize((40, 300)).save(folder / "needle.png")
    base = ["--train_data_dir", str(tmp_path / "img"), "--enable_bucket", "--bucket_no_upscale", "--caption_extension",
            ".txt"]
    scan = scan_from_args(parse(base + ["--resolution", "512"]))
    got = {os.path.basename(i.path): (i.bucket, i.resized) for i in scan.datasets[0].train}
    assert got == {"strip.png": ((448, 128), (448, 172)), "square.png": ((192, 192), (200, 200))}
    [bad] = scan.bad_files
    assert os.path.basename(bad.path) == "needle.png"
    assert bad.reason.startswith("no bucket can hold it: --bucket_no_upscale keeps its size 40x300, and a side under "
                                  "--bucket_reso_steps 64 gives an empty bucket")

    # a small resolution shrinks large images below one step: reported, not PIL's "height and width must be > 0"
    small = scan_from_args(parse(base + ["--resolution", "64", "--min_bucket_reso", "64"]))
    reasons = {os.path.basename(b.path): b.reason for b in small.bad_files}
    assert set(reasons) == {"strip.png", "needle.png"}  # 448x172 shrinks to a 4096-pixel strip under 64 high
    assert reasons["strip.png"].startswith("no bucket can hold it: --bucket_no_upscale shrinks 448x172 to the area "
                                           "of --resolution 64,64, leaving a side under --bucket_reso_steps 64")
    assert [(os.path.basename(i.path), i.bucket) for i in small.datasets[0].train] == [("square.png", (64, 64))]


def test_conditioning_image_problems(tmp_path):
    images, cond = tmp_path / "images", tmp_path / "cond"
    images.mkdir()
    cond.mkdir()
    for name in ("a", "b", "c"):
        photo("astronaut").save(images / f"{name}.png")
    photo("astronaut").save(cond / "a.png")
    photo("coffee").save(cond / "b.png")  # wrong size
    (cond / "c.png").write_bytes(b"")  # broken
    args = parse(["--train_data_dir", str(images), "--resolution", "128"])
    args.conditioning_data_dir = str(cond)
    config = load_dataset_config(None, args, support_dreambooth=False, support_finetuning=False,
                                 support_controlnet=True)
    scan = scan_dataset(config)
    reasons = {os.path.basename(b.path): b.reason for b in scan.bad_files}
    assert set(reasons) == {"b.png", "c.png"}
    assert "300x200" in reasons["b.png"] and "256x256" in reasons["b.png"]
    assert "empty file" in reasons["c.png"]
    assert [os.path.basename(i.path) for i in scan.datasets[0].train] == ["a.png"]


def test_reg_images_rebalanced_after_skipping(tmp_path):
    train = tmp_path / "img" / "4_sks"
    reg = tmp_path / "reg" / "1_person"
    train.mkdir(parents=True)
    reg.mkdir(parents=True)
    photo("astronaut").save(train / "a.png")
    (train / "b.png").write_bytes(b"")  # bad: training samples drop from 8 to 4
    for i in range(6):
        photo("coffee").save(reg / f"r{i}.png")
    scan = scan_dir(tmp_path / "img", "--reg_data_dir", str(tmp_path / "reg"), "--skip_bad_images",
                    "--prior_loss_weight", "0.5")
    entries = [i.entry for i in scan.datasets[0].train]
    assert sum(e.repeats for e in entries if not e.is_reg) == 4
    assert sum(e.repeats for e in entries if e.is_reg) == 4
    assert {e.loss_weight for e in entries if e.is_reg} == {0.5}


# ---------------------------------------------------------------- batches


def test_batches_never_mix_buckets_and_cover_every_repeat(good_dir):
    scan = scan_dir(good_dir, "--train_batch_size", "2")
    dataset = TrainDataset(scan, SD1, seed=5)
    batches = dataset.epoch_batches(1)
    assert len(batches) == dataset.num_batches(1) == scan.datasets[0].num_batches()
    seen = []
    for batch in batches:
        buckets = {scan.datasets[0].train[i].bucket for i in batch.items}
        assert buckets == {batch.resolution} and 1 <= len(batch.items) <= 2
        seen += batch.items
    assert sorted(seen) == sorted(i for i in range(4) for _ in range(3))  # 4 images x 3 repeats
    square = [i for i in scan.datasets[0].train if i.path.endswith("astronaut.png")][0]
    assert square.bucket == (256, 256) and square.size == (256, 256)


def test_same_seed_same_batches_and_captions(good_dir, tokenizers):
    def first_epochs(seed):
        scan = scan_dir(good_dir, "--train_batch_size", "2", "--shuffle_caption", "--flip_aug", "--random_crop",
                        "--caption_tag_dropout_rate", "0.3", "--color_aug")
        dataset = TrainDataset(scan, SD1, tokenizers["sd1"], seed=seed)
        out = []
        for epoch in (1, 2):
            for k, batch in enumerate(dataset.epoch_batches(epoch)):
                loaded = dataset.load_batch(batch, epoch, global_step=k)
                out.append((batch.items, loaded["captions"], loaded["flipped"], loaded["crop_top_lefts"].tolist(),
                            loaded["images"].sum().item(), loaded["input_ids"][0].tolist()))
        return out

    a, b = first_epochs(7), first_epochs(7)
    assert a == b
    other = first_epochs(8)
    assert [x[0] for x in a] != [x[0] for x in other] or [x[1] for x in a] != [x[1] for x in other]
    # the epochs differ from each other
    dataset = TrainDataset(scan_dir(good_dir, "--train_batch_size", "2"), SD1, seed=7)
    assert [b.items for b in dataset.epoch_batches(1)] != [b.items for b in dataset.epoch_batches(2)]


def test_several_datasets_keep_their_own_batch_sizes(good_dir, mixed_dir, tmp_path):
    config_file = tmp_path / "two.toml"
    config_file.write_text(
        f"""
[general]
caption_extension = ".txt"
enable_bucket = true
min_bucket_reso = 128
[[datasets]]
resolution = 256
batch_size = 3
  [[datasets.subsets]]
  image_dir = "{good_dir / '3_sks'}"
  num_repeats = 3
[[datasets]]
resolution = 128
batch_size = 1
  [[datasets.subsets]]
  image_dir = "{good_dir / '3_sks'}"
""",
        encoding="utf-8",
    )
    scan = scan_from_args(parse(["--dataset_config", str(config_file)]))
    dataset = TrainDataset(scan, SD1, seed=3)
    batches = list(dataset.epoch_batches(1))
    assert len(batches) == dataset.num_batches() == scan.datasets[0].num_batches() + 4
    for batch in batches:
        datasets = {0 if i < 4 else 1 for i in batch.items}
        assert len(datasets) == 1
        if datasets == {1}:
            assert len(batch.items) == 1 and max(batch.resolution) <= 192
    assert sorted(i for b in batches for i in b.items) == sorted([i for i in range(4) for _ in range(3)] + [4, 5, 6, 7])
    again = TrainDataset(scan, SD1, seed=3).epoch_batches(1)
    assert [b.items for b in again] == [b.items for b in batches]


# ---------------------------------------------------------------- batch contents


def test_load_batch_sd1(good_dir, tokenizers):
    scan = scan_dir(good_dir, "--train_batch_size", "4")
    dataset = TrainDataset(scan, SD1, tokenizers["sd1"], seed=0, max_token_length=150)
    for batch in dataset.epoch_batches(1):
        out = dataset.load_batch(batch, 1, 0)
        w, h = batch.resolution
        b = len(batch.items)
        assert out["images"].shape == (b, 3, h, w) and out["images"].dtype == torch.float32
        assert out["images"].min() >= -1.0 and out["images"].max() <= 1.0 and out["images"].std() > 0.05
        assert len(out["input_ids"]) == 1 and out["input_ids"][0].shape == (b, 2, 77)
        assert out["input_ids"][0][:, 0, 0].tolist() == [49406] * b
        assert out["loss_weights"].tolist() == [1.0] * b and out["network_multipliers"].tolist() == [1.0] * b
        assert out["target_sizes_hw"].tolist() == [[h, w]] * b
        assert out["captions"] == [scan.datasets[0].train[i].entry.caption for i in batch.items]
        assert "alpha_masks" not in out and "conditioning_images" not in out and "latents" not in out


def test_load_batch_sdxl_size_conditioning(good_dir, tokenizers):
    scan = scan_dir(good_dir, "--train_batch_size", "4", family=SDXL)
    dataset = TrainDataset(scan, SDXL, tokenizers["sdxl"], seed=0)
    chelsea_index = next(i for i in range(len(dataset)) if dataset.sample_path(i).endswith("chelsea.jpg"))
    batch = next(b for b in dataset.epoch_batches(1) if chelsea_index in b.items)
    out = dataset.load_batch(batch, 1, 0)
    assert len(out["input_ids"]) == 2 and all(ids.shape == (len(batch.items), 1, 77) for ids in out["input_ids"])
    # TE1 pads with EOS, TE2 with "!" (id 0)
    assert out["input_ids"][0][0, 0, -1].item() == 49407 and out["input_ids"][1][0, 0, -1].item() == 0
    row = batch.items.index(chelsea_index)
    image = scan.datasets[0].train[chelsea_index]
    assert image.size == (451, 300) and image.bucket == (320, 192)
    assert image.resized == (320, 213)  # cover-resized by width, so the crop is vertical
    assert out["original_sizes_hw"][row].tolist() == [300, 451]
    assert out["crop_top_lefts"][row].tolist() == [10, 0]
    assert out["target_sizes_hw"][row].tolist() == [192, 320]
    assert out["original_sizes_hw"].dtype == torch.int64


def test_flipped_sample_mirrors_pixels_and_crop(good_dir):
    scan = scan_dir(good_dir, "--train_batch_size", "1", "--flip_aug")
    dataset = TrainDataset(scan, SD1, seed=11)
    index = next(i for i in range(len(dataset)) if dataset.sample_path(i).endswith("chelsea.jpg"))
    found = {}
    for step in range(40):
        out = dataset.load_batch(bucketing.Batch(0, (320, 192), [index]), 1, step)
        found.setdefault(out["flipped"][0], out)
        if len(found) == 2:
            break
    plain, flipped = found[False], found[True]
    assert torch.equal(flipped["images"], torch.flip(plain["images"], dims=[3]))
    resized_w = scan.datasets[0].train[index].resized[0]
    left = plain["crop_top_lefts"][0, 1].item()
    assert flipped["crop_top_lefts"][0, 1].item() == resized_w - left - 320


def test_weighted_captions(good_dir, tokenizers):
    scan = scan_dir(good_dir, "--caption_prefix", "(best:1.5)")
    dataset = TrainDataset(scan, SD1, tokenizers["sd1"], seed=0, weighted_captions=True)
    out = dataset.load_batch(dataset.epoch_batches(1)[0], 1, 0)
    ids, weights = out["input_ids"][0], out["input_id_weights"][0]
    assert ids.shape == weights.shape == (1, 1, 77)
    assert weights[0, 0, 1].item() == pytest.approx(1.5) and weights[0, 0, 2].item() == 1.0


def test_validation_split_and_epoch_view(good_dir, tmp_path):
    config_file = tmp_path / "val.toml"
    image_dir = good_dir / "3_sks"
    config_file.write_text(
        f'[[datasets]]\nresolution = 256\nenable_bucket = true\nmin_bucket_reso = 128\nvalidation_split = 0.5\n'
        f'validation_seed = 1\ncaption_extension = ".txt"\n'
        f'[[datasets.subsets]]\nimage_dir = "{image_dir}"\nnum_repeats = 2\n',
        encoding="utf-8",
    )
    scan = scan_from_args(parse(["--dataset_config", str(config_file)]))
    train = TrainDataset(scan, SD1, seed=0)
    validation = TrainDataset(scan, SD1, seed=0, split="validation")
    train_paths = {train.sample_path(i) for i in range(len(train))}
    validation_paths = {validation.sample_path(i) for i in range(len(validation))}
    assert len(train_paths) == len(validation_paths) == 2 and not train_paths & validation_paths
    assert validation.num_batches() == 2 and train.num_batches() == 4  # validation images once, training twice

    view = train.epoch_view(2, first_global_step=10, gradient_accumulation_steps=2, start_batch=1)
    loader = torch.utils.data.DataLoader(view, batch_size=None, shuffle=False)
    loaded = list(loader)
    batches = train.epoch_batches(2)
    assert len(loaded) == 3
    for i, out in enumerate(loaded, start=1):
        expected = train.load_batch(batches[i], 2, 10 + i // 2)
        assert out["image_paths"] == expected["image_paths"] and torch.equal(out["images"], expected["images"])


def test_caption_processing_applied(good_dir):
    scan = scan_dir(good_dir, "--caption_prefix", "best", "--shuffle_caption", "--keep_tokens", "1",
                    "--caption_dropout_every_n_epochs", "3")
    dataset = TrainDataset(scan, SD1, seed=2)
    index = next(i for i in range(len(dataset)) if dataset.sample_path(i).endswith("chelsea.jpg"))
    captions = {dataset.caption(index, 1, step) for step in range(30)}
    assert all(c.startswith("best chelsea, ") for c in captions)
    assert all(sorted(c.split(", ")[1:]) == ["cat", "orange", "whiskers"] for c in captions)
    assert len(captions) > 1  # shuffled differently at different steps
    assert dataset.caption(index, 3, 0) == ""  # every 3rd epoch drops all captions
    assert dataset.caption(index, 1, 4) == dataset.caption(index, 1, 4)


def test_rgb_conversion_of_every_mode(tmp_path):
    folder = tmp_path / "img" / "1_modes"
    folder.mkdir(parents=True)
    rgb = np.asarray(photo("astronaut").resize((64, 64)))
    gray = rgb[..., 1].copy()
    Image.fromarray(gray).save(folder / "gray.png")
    wide = gray.astype(np.uint16) * 256 + 77
    Image.fromarray(wide).save(folder / "sixteen.png")
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette.save(folder / "palette.png", transparency=2)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    Image.fromarray(np.dstack([rgb, gray])).save(folder / "rgba.png")
    scan = scan_from_args(parse(["--train_data_dir", str(tmp_path / "img"), "--resolution", "64"]))
    assert scan.ok and len(scan.datasets[0].train) == 5
    dataset = TrainDataset(scan, SD1, seed=0)
    expected = {
        "gray.png": np.dstack([gray] * 3),
        "sixteen.png": np.dstack([(wide.astype(np.int64) * 255 + 32767) // 65535] * 3),
        "palette.png": np.asarray(palette.convert("RGB")),
        "cmyk.jpg": np.asarray(Image.open(folder / "cmyk.jpg").convert("RGB")),
        "rgba.png": rgb,
    }
    for index in range(len(dataset)):
        out = dataset.load_batch(bucketing.Batch(0, (64, 64), [index]), 1, 0)
        pixels = ((out["images"][0].permute(1, 2, 0) + 1) * 127.5).round().numpy().astype(np.int64)
        name = os.path.basename(dataset.sample_path(index))
        assert np.abs(pixels - expected[name]).max() <= 1, name
    cmyk = np.asarray(Image.open(folder / "cmyk.jpg").convert("RGB")).astype(int)
    assert np.abs(cmyk - rgb).mean() < 12  # CMYK really came back as the photo's colours


def test_alpha_masks(tmp_path):
    folder = tmp_path / "masked"
    folder.mkdir()
    rgb = np.asarray(photo("astronaut").resize((64, 64)))
    alpha = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    Image.fromarray(np.dstack([rgb, alpha])).save(folder / "a.png")
    Image.fromarray(rgb).save(folder / "b.png")  # no alpha: mask of ones
    config_file = tmp_path / "masked.toml"
    config_file.write_text(
        f'[[datasets]]\nresolution = 64\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = "{folder}"\nalpha_mask = true\n',
        encoding="utf-8",
    )
    scan = scan_from_args(parse(["--dataset_config", str(config_file)]))
    dataset = TrainDataset(scan, SD1, seed=0)
    batch = dataset.epoch_batches(1)[0]
    out = dataset.load_batch(batch, 1, 0)
    masks = {os.path.basename(p): m for p, m in zip(out["image_paths"], out["alpha_masks"])}
    assert out["alpha_masks"].shape == (2, 64, 64)
    assert torch.allclose(masks["a.png"], torch.from_numpy(alpha).float() / 255)
    assert torch.equal(masks["b.png"], torch.ones(64, 64))
    # with cached latents that carry no mask, the mask is still read from the file
    cached = TrainDataset(scan, SD1, seed=0, latent_provider=lambda s: torch.zeros(4, 8, 8)).load_batch(batch, 1, 0)
    assert "images" not in cached and torch.equal(cached["alpha_masks"], out["alpha_masks"])


def test_controlnet_conditioning_images(tmp_path):
    images, cond = tmp_path / "images", tmp_path / "cond"
    images.mkdir()
    cond.mkdir()
    photo("chelsea", 1.0).save(images / "cat.png")
    (images / "cat.caption").write_text("a cat", encoding="utf-8")
    mask = np.zeros((300, 451, 3), dtype=np.uint8)
    mask[:, :200] = 255
    Image.fromarray(mask).save(cond / "cat.png")
    config_file = tmp_path / "cn.toml"
    config_file.write_text(
        f'[[datasets]]\nresolution = 256\nenable_bucket = true\nmin_bucket_reso = 128\n'
        f'[[datasets.subsets]]\nimage_dir = "{images}"\nconditioning_data_dir = "{cond}"\n',
        encoding="utf-8",
    )
    scan = scan_from_args(parse(["--dataset_config", str(config_file), "--masked_loss"]))
    dataset = TrainDataset(scan, SD1, seed=0)
    out = dataset.load_batch(dataset.epoch_batches(1)[0], 1, 0)
    cond_images = out["conditioning_images"]
    assert cond_images.shape == out["images"].shape == (1, 3, 192, 320)
    assert out["captions"] == ["a cat"]
    # the white left part of the mask stays on the left after resize + centre crop
    assert cond_images[0, 0, :, :100].min() > 0.9 and cond_images[0, 0, :, -100:].max() < -0.9


# ---------------------------------------------------------------- cache hooks and rules


def test_latent_provider_replaces_pixels(good_dir):
    scan = scan_dir(good_dir, "--train_batch_size", "2", "--flip_aug")
    asked = []

    def provider(sample: SampleDescriptor):
        asked.append(sample)
        h, w = sample.latent_size_hw
        return torch.full((4, h, w), 2.0 if sample.flip else 1.0)

    dataset = TrainDataset(scan, SD1, seed=4, latent_provider=provider, cache_latents=True)
    batch = dataset.epoch_batches(1)[0]
    out = dataset.load_batch(batch, 1, 0)
    w, h = batch.resolution
    assert "images" not in out and out["latents"].shape == (len(batch.items), 4, h // 8, w // 8)
    assert [float(x[0, 0, 0]) for x in out["latents"]] == [2.0 if f else 1.0 for f in out["flipped"]]
    assert all(s.plan.bucket == batch.resolution for s in asked)
    # what a cache must hold: centre crops, flipped and not
    wanted = dataset.latent_cache_samples()
    assert len(wanted) == 8 and {s.flip for s in wanted} == {False, True}
    assert all(d in wanted for d in asked)
    # a provider without the latents makes the batch fall back to pixels
    fallback = TrainDataset(scan, SD1, seed=4, latent_provider=lambda s: None).load_batch(batch, 1, 0)
    assert fallback["images"].shape == (len(batch.items), 3, h, w)


def test_latent_caching_refuses_changing_pixels(good_dir):
    for flag in ("--random_crop", "--color_aug"):
        scan = scan_dir(good_dir, flag)
        with pytest.raises(UserError, match=flag[2:]):
            TrainDataset(scan, SD1, seed=0, cache_latents=True)


def test_text_provider_and_its_rule(good_dir):
    scan = scan_dir(good_dir)
    dataset = TrainDataset(scan, SD1, seed=0, text_provider=lambda sample, caption: ("cached", caption))
    out = dataset.load_batch(dataset.epoch_batches(1)[0], 1, 0)
    assert out["text_outputs"] == [("cached", c) for c in out["captions"]]
    with pytest.raises(UserError, match="shuffle_caption"):
        TrainDataset(scan_dir(good_dir, "--shuffle_caption"), SD1, seed=0, text_provider=lambda s, c: None)


# ---------------------------------------------------------------- augmentation helpers


def test_face_crop_plan_numbers():
    assert face_info_from_name("/x/pic_300_200_80_100.png") == (300, 200, 80, 100)
    assert face_info_from_name("/x/my_pic_a_b_c.png") is None
    # 1000x800 image, face of 100 px at (300, 200), target 256x256, range 2..2: the face should fill half of
    # 256 px, which needs a zoom of 1.28; zooms are capped at 1, so the image keeps its size
    plan = face_crop_plan((1000, 800), (256, 256), (300, 200, 80, 100), (2.0, 2.0), False, random.Random(0))
    assert plan.resized_size == (1000, 800)
    assert (plan.left, plan.top) == (300 - 128, 200 - 128)  # centred on the face
    plan = face_crop_plan((2000, 2000), (256, 256), (1000, 1000, 200, 200), (2.0, 2.0), False, random.Random(0))
    assert plan.resized_size == (1280, 1280)  # 256 / (200 * 2) = 0.64
    assert (plan.left, plan.top) == (640 - 128, 640 - 128)
    # a face near the corner: the crop is clamped inside the image
    plan = face_crop_plan((2000, 2000), (256, 256), (50, 1990, 200, 200), (2.0, 2.0), False, random.Random(0))
    assert (plan.left, plan.top) == (0, 1280 - 256)
    # a zoom range draws the zoom from the generator: same seed, same plan
    plans = {face_crop_plan((2000, 2000), (256, 256), (1000, 1000, 200, 200), (1.0, 3.0), False, random.Random(s))
             for s in range(5)}
    # zoom between 256 / (200 * 3) and 1 (256 / 200 is capped at 1)
    assert len(plans) == 5 and all(853 <= p.resized_size[0] <= 2000 for p in plans)


def test_color_augment_is_seeded_and_mild():
    image = np.asarray(photo("coffee"))
    outputs = [color_augment(image, random.Random(seed)) for seed in range(20)]
    changed = [o for o in outputs if not np.array_equal(o, image)]
    assert 0 < len(changed) < 20  # applied about a third of the time
    assert all(np.abs(o.astype(int) - image).mean() < 20 for o in changed)
    assert np.array_equal(color_augment(image, random.Random(3)), color_augment(image, random.Random(3)))
