"""Tests for the latent and text-encoder output caches and the cache tools, on tiny random models.

Covers: hit/miss counting, content keys (one changed image byte re-encodes exactly that entry),
damaged entries recomputed with a warning, cached values = the VAE posterior sample, flip twins,
memory-only mode, VAE identity, multi-process sharing, text-encoder keys (caption, clip_skip),
caching blockers, and the three tools end to end.
"""

import copy
import json
import logging
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from library.caching import latent_cache as lc
from library.caching import text_encoder_cache as tec
from library.data.bucketing import plan_crop
from library.caching.settings import CacheSettings, add_cache_arguments
from library.caching.store import BESIDE_IMAGES, CACHE_FOLDER
from library.caching.tools import collect_cache_items, latent_samples_of, load_vae_for_caching
from library.errors import UserError
from library.models.families import SD1, SDXL
from library.data.image_transforms import training_pixels
from library.models.random_models import build_random_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- fixtures -------------------------------------------------------------------------------------


def _photos() -> dict:
    import skimage.data as data

    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea(), "rocket": data.rocket()}


@pytest.fixture(scope="module")
def photos():
    """Small uint8 RGB arrays of scikit-image sample photos (long side 160)."""
    out = {}
    for name, array in _photos().items():
        image = Image.fromarray(array)
        image.thumbnail((160, 160))
        out[name] = np.asarray(image)
    return out


@pytest.fixture(scope="module")
def sd1():
    return build_random_models(SD1, "tiny", seed=0)


def write_images(folder, photos, ext=".png") -> list:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, array in photos.items():
        path = os.path.join(str(folder), name + ext)
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def samples_for(paths, bucket=(64, 64)) -> list:
    out = []
    for path in paths:
        w, h = Image.open(path).size
        scale = max(bucket[0] / w, bucket[1] / h)
        resized = (max(bucket[0], int(w * scale + 0.5)), max(bucket[1], int(h * scale + 0.5)))
        out.append(lc.LatentSample(path, plan_crop((w, h), resized, bucket)))
    return out


def entry_files(root) -> dict:
    """{path: mtime_ns} of every cache entry file under root."""
    found = {}
    for directory, _, files in os.walk(root):
        for name in files:
            if name.endswith(".safetensors"):
                path = os.path.join(directory, name)
                found[path] = os.stat(path).st_mtime_ns
    return found


# --- latent cache ---------------------------------------------------------------------------------


def test_hits_and_misses_are_counted(tmp_path, photos, sd1):
    paths = write_images(tmp_path / "img", photos)
    samples = samples_for(paths)
    cache = lc.LatentCache(sd1.vae, SD1, str(tmp_path / "cache"), vae_batch_size=3)
    first = cache.ensure(samples + samples[:2])  # duplicates count once
    assert (first.requested, first.unique, first.hits, first.encoded) == (6, 4, 0, 4)
    assert first.hashed_files == 4
    assert len(entry_files(tmp_path / "cache")) == 4

    again = lc.LatentCache(sd1.vae, SD1, str(tmp_path / "cache"), vae_batch_size=3)  # a later run
    second = again.ensure(samples)
    assert (second.hits, second.encoded, second.hashed_files) == (4, 0, 0)  # hashes come from the memo
    assert samples[0] in again


def test_one_changed_byte_reencodes_only_that_entry(tmp_path, photos, sd1):
    paths = write_images(tmp_path / "img", photos, ext=".bmp")  # uncompressed: one byte = one pixel value
    samples = samples_for(paths)
    cache = lc.LatentCache(sd1.vae, SD1, BESIDE_IMAGES, vae_batch_size=4)
    cache.ensure(lc.with_flips(samples))
    before = entry_files(tmp_path / "img" / CACHE_FOLDER)
    assert len(before) == 8
    old = cache.get(samples[1])

    middle = os.path.getsize(paths[1]) // 2  # a pixel in the middle row, inside the crop
    with open(paths[1], "r+b") as f:
        f.seek(middle)
        value = f.read(1)[0]
        f.seek(middle)
        f.write(bytes([value ^ 0xFF]))
    stats = lc.LatentCache(sd1.vae, SD1, BESIDE_IMAGES, vae_batch_size=4).ensure(lc.with_flips(samples))
    assert (stats.hits, stats.encoded, stats.hashed_files) == (6, 2, 1)  # the image and its flip twin
    after = entry_files(tmp_path / "img" / CACHE_FOLDER)
    assert len(after) == 10
    assert all(after[p] == t for p, t in before.items())  # nothing rewritten
    new = cache.get(samples[1])
    assert not torch.equal(old, new)


def test_damaged_entries_are_recomputed_with_a_warning(tmp_path, photos, sd1, caplog):
    paths = write_images(tmp_path / "img", photos)
    samples = samples_for(paths)
    cache = lc.LatentCache(sd1.vae, SD1, str(tmp_path / "cache"))
    cache.ensure(samples)
    good = [cache.get(s).clone() for s in samples]

    truncated = cache.entry_path(samples[0])
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) - 7)
    flipped_bit = cache.entry_path(samples[1])
    with open(flipped_bit, "r+b") as f:
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte ^ 1]))
    open(cache.entry_path(samples[2]), "wb").close()  # empty file

    with caplog.at_level(logging.WARNING):
        stats = cache.ensure(samples)
    # The header check finds truncation; a flipped data bit passes it and is caught by the read's CRC.
    assert (stats.damaged, stats.encoded, stats.hits) == (2, 2, 2)
    assert truncated in caplog.text and "damaged" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        values = [cache.get(s) for s in samples]
    assert flipped_bit in caplog.text and "checksum" in caplog.text
    for value, expected in zip(values, good):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)


@dataclass(frozen=True)
class Descriptor:
    """Same fields as the training dataset's SampleDescriptor (the provider duck-types them)."""

    path: str
    plan: tuple
    flip: bool = False
    alpha_mask: bool = False


def test_without_vae_misses_are_errors_or_provider_fallbacks(tmp_path, photos, sd1):
    paths = write_images(tmp_path / "img", dict(list(photos.items())[:2]))
    cached, uncached = samples_for(paths)
    cache = lc.LatentCache(sd1.vae, SD1, str(tmp_path / "cache"))
    cache.ensure([cached])
    cache.release_vae()
    found = cache.provide(Descriptor(cached.path, cached.plan))
    assert found["latents"].shape == (4, 8, 8) and found["alpha_mask"] is None
    in_worker = pickle.loads(pickle.dumps(cache))  # what a spawned data-loader worker receives
    assert torch.equal(in_worker.provide(Descriptor(cached.path, cached.plan))["latents"], found["latents"])
    assert cache.provide(Descriptor(uncached.path, uncached.plan)) is None  # the dataset then uses pixels
    with pytest.raises(UserError, match="not in the cache"):
        cache.get(uncached)
    with open(cache.entry_path(cached), "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match="damaged latent cache entry"):
        cache.get(cached)


def test_cached_latents_are_the_seeded_posterior_sample(tmp_path, photos, sd1):
    paths = write_images(tmp_path / "img", photos)
    samples = samples_for(paths, bucket=(64, 96)) + [s._replace(flip=True) for s in samples_for(paths, bucket=(64, 96))]
    cache = lc.LatentCache(sd1.vae, SD1, str(tmp_path / "cache"), vae_batch_size=8)
    cache.ensure(samples)
    for sample in (samples[0], samples[5]):
        latents = cache.get(sample)
        assert latents.shape == (4, 12, 8) and latents.dtype == torch.float32  # (C, H/8, W/8), unscaled
        pixels = training_pixels(sample.path, sample.plan, sample.flip)
        with torch.no_grad():
            posterior = sd1.vae.encode(pixels[None]).latent_dist
        expected = posterior.mean[0] + posterior.std[0] * lc.sample_noise(cache.key(sample), (4, 12, 8))
        torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-5)
    # A flip twin is the encoding of the flipped pixels, not a flipped latent.
    assert not torch.allclose(cache.get(samples[5]), cache.get(samples[1]).flip(-1), atol=1e-3)


def test_memory_only_cache_writes_nothing_and_matches_disk(tmp_path, photos, sd1):
    paths = write_images(tmp_path / "img", dict(list(photos.items())[:2]))
    samples = samples_for(paths)
    memory = lc.LatentCache(sd1.vae, SD1, None, vae_batch_size=2)
    stats = memory.ensure(lc.with_flips(samples))
    assert (stats.unique, stats.encoded) == (4, 4)
    assert memory.ensure(samples).hits == 2
    assert sorted(os.listdir(tmp_path / "img")) == sorted(os.path.basename(p) for p in paths)
    disk = lc.LatentCache(sd1.vae, SD1, str(tmp_path / "cache"))
    disk.ensure(samples[:1])
    # Same key, same noise: only batch-size rounding differs.
    torch.testing.assert_close(memory.get(samples[0]), disk.get(samples[0]), rtol=1e-4, atol=1e-5)


def test_vae_identity_covers_the_encoder_only(tmp_path, photos, sd1):
    paths = write_images(tmp_path / "img", dict(list(photos.items())[:2]))
    samples = samples_for(paths)
    lc.LatentCache(sd1.vae, SD1, str(tmp_path / "cache")).ensure(samples)

    decoder_changed = copy.deepcopy(sd1.vae)
    with torch.no_grad():
        decoder_changed.decoder.conv_out.bias.add_(1.0)
    assert lc.LatentCache(decoder_changed, SD1, str(tmp_path / "cache")).ensure(samples).hits == 2

    encoder_changed = copy.deepcopy(sd1.vae)
    with torch.no_grad():
        encoder_changed.encoder.conv_in.weight.view(-1)[7] += 1e-3
    stats = lc.LatentCache(encoder_changed, SD1, str(tmp_path / "cache")).ensure(samples)
    assert (stats.hits, stats.encoded) == (0, 2)


def test_a_vae_held_in_half_encodes_like_a_float32_one(tmp_path, photos, sd1):
    """A float32 run keeps an fp16 file's VAE weights in fp16 and computes in float32: same latents,
    same cache keys as the VAE read in float32 from the same file."""
    from library.models.frozen_weights import compute_dtype, hold_in_half, is_held_in_half

    paths = write_images(tmp_path / "img", dict(list(photos.items())[:2]))
    samples = samples_for(paths)
    as_fp32 = copy.deepcopy(sd1.vae).half().float()  # what reading an fp16 file in float32 gives
    held = copy.deepcopy(sd1.vae).half()
    held.requires_grad_(False)
    hold_in_half(held)
    assert is_held_in_half(held) and compute_dtype(held) == torch.float32
    assert held.encoder.conv_in.weight.dtype == torch.float16

    reference = lc.LatentCache(as_fp32, SD1, str(tmp_path / "cache"))
    reference.ensure(samples)
    cache = lc.LatentCache(held, SD1, str(tmp_path / "cache"))
    assert cache.vae_id == reference.vae_id
    assert cache.ensure(samples).hits == 2  # the float32 VAE's entries serve the half-held one

    fresh = lc.LatentCache(held, SD1)  # in memory: encoded by the half-held VAE itself
    fresh.ensure(samples)
    same_path = copy.deepcopy(as_fp32)  # float32 convolutions swapped too: the same CPU conv paths
    same_path.requires_grad_(False)
    hold_in_half(same_path)
    exact = lc.LatentCache(same_path, SD1)
    exact.ensure(samples)
    for sample in samples:
        assert torch.equal(fresh.get(sample), exact.get(sample))
        torch.testing.assert_close(fresh.get(sample), reference.get(sample), rtol=1e-4, atol=1e-5)


def test_alpha_masks_are_stored_with_the_latents(tmp_path, photos, sd1):
    rgb = photos["coffee"]
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1]).astype(np.uint8), (rgb.shape[0], 1))
    path = str(tmp_path / "masked.png")
    Image.fromarray(np.dstack([rgb, alpha])).save(path)
    sample = samples_for([path])[0]._replace(alpha_mask=True)
    cache = lc.LatentCache(sd1.vae, SD1, str(tmp_path / "cache"))
    cache.ensure(lc.with_flips([sample]))
    entry, flipped = cache.load(sample), cache.load(sample._replace(flip=True))
    assert entry.alpha_mask.shape == (64, 64)
    assert entry.alpha_mask[0, 0] < 0.2 and entry.alpha_mask[0, -1] > 0.8  # alpha rises left to right
    torch.testing.assert_close(flipped.alpha_mask, entry.alpha_mask.flip(-1))


def test_processes_share_the_work(tmp_path, photos, sd1):
    paths = write_images(tmp_path / "img", photos)
    samples = samples_for(paths)
    cache = lc.LatentCache(sd1.vae, SD1, str(tmp_path / "cache"))
    first = cache.ensure(samples, process_index=0, num_processes=2)
    second = cache.ensure(samples, process_index=1, num_processes=2)
    assert (first.encoded, first.other_process, second.encoded, second.other_process) == (2, 2, 2, 2)
    assert cache.ensure(samples).hits == 4


def test_cache_flags_and_settings():
    import argparse

    from library.data.flags import add_dataset_arguments

    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)  # defines the latent flags already
    add_cache_arguments(parser)
    args = parser.parse_args(["--cache_latents_to_disk", "--vae_batch_size", "4", "--cache_text_encoder_outputs"])
    settings = CacheSettings.from_args(args)
    assert settings.latents and settings.latents_to_disk and settings.vae_batch_size == 4
    assert settings.latent_location() == BESIDE_IMAGES and settings.text_encoder_location() is None
    args = parser.parse_args(["--cache_latents", "--cache_dir", "somewhere"])
    assert CacheSettings.from_args(args).latent_location() is None  # memory: --cache_dir only places disk caches
    with pytest.raises(UserError, match="--vae_batch_size"):
        CacheSettings.from_args(parser.parse_args(["--vae_batch_size", "0"]))


# --- text-encoder output cache ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_conditioner(sd1):
    from library.text.encoding import TextConditioner
    from library.text.tokenizer import load_tokenizers

    return TextConditioner(SD1, load_tokenizers(SD1), sd1.text_encoders)


def test_text_cache_is_keyed_on_caption_and_clip_skip(tmp_path, sd1_conditioner):
    captions = ["a photo of a cat", "a dog", "a photo of a cat"]
    cache = tec.TextEncoderOutputCache(sd1_conditioner, str(tmp_path), batch_size=2)
    stats = cache.ensure(captions)
    assert (stats.requested, stats.unique, stats.encoded) == (3, 2, 2)
    context, pooled = cache.load("a dog")
    with torch.no_grad():
        direct = sd1_conditioner.encode(["a dog"])
    assert context.shape == (77, 32) and pooled is None
    torch.testing.assert_close(context, direct.context[0], rtol=1e-5, atol=1e-6)

    again = tec.TextEncoderOutputCache(sd1_conditioner, str(tmp_path), batch_size=2)
    assert again.ensure(captions + ["a dog."]).encoded == 1  # only the new caption
    skip2 = tec.TextEncoderOutputCache(sd1_conditioner, str(tmp_path), clip_skip=2)
    assert skip2.key("a dog") != again.key("a dog")
    assert skip2.ensure(captions).encoded == 2
    with torch.no_grad():
        direct2 = sd1_conditioner.encode(["a dog"], clip_skip=2)
    torch.testing.assert_close(skip2.get("a dog").context, direct2.context[0], rtol=1e-5, atol=1e-6)
    long = tec.TextEncoderOutputCache(sd1_conditioner, None, max_token_length=150)
    assert long.get_batch(["a dog", "a cat"]).context.shape == (2, 152, 32)


def test_text_encoders_held_in_half_share_entries_with_float32_ones(tmp_path, sd1):
    """A LoRA run holds a frozen fp16 text encoder in fp16 (token table included) and computes in
    float32: same outputs and the same cache key as the encoder read in float32 from that file."""
    from library.models.frozen_weights import hold_in_half, is_held_in_half
    from library.text.encoding import TextConditioner
    from library.text.tokenizer import load_tokenizers

    as_fp32 = copy.deepcopy(sd1.text_encoders[0]).half().float().requires_grad_(False)
    held = copy.deepcopy(sd1.text_encoders[0]).half().requires_grad_(False)
    hold_in_half(held)
    assert is_held_in_half(held) and held.get_input_embeddings().weight.dtype == torch.float16
    tokenizers = load_tokenizers(SD1)
    full = tec.TextEncoderOutputCache(TextConditioner(SD1, tokenizers, [as_fp32]), str(tmp_path))
    half = tec.TextEncoderOutputCache(TextConditioner(SD1, tokenizers, [held]), str(tmp_path))
    assert half.key("a dog") == full.key("a dog")
    full.ensure(["a dog"])
    assert half.ensure(["a dog"]).hits == 1
    with torch.no_grad():
        a = TextConditioner(SD1, tokenizers, [held]).encode(["a dog"]).context
        b = TextConditioner(SD1, tokenizers, [as_fp32]).encode(["a dog"]).context
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_text_cache_damaged_entry_is_recomputed(tmp_path, sd1_conditioner, caplog):
    cache = tec.TextEncoderOutputCache(sd1_conditioner, str(tmp_path))
    cache.ensure(["a cat"])
    expected = cache.get("a cat").context.clone()
    with open(cache.entry_path("a cat"), "r+b") as f:
        f.truncate(50)
    with caplog.at_level(logging.WARNING):
        stats = cache.ensure(["a cat"])
    assert stats.damaged == 1 and "damaged" in caplog.text
    assert torch.equal(cache.get("a cat").context, expected)


def test_sdxl_text_cache_stores_pooled(tmp_path):
    from library.text.encoding import TextConditioner
    from library.text.tokenizer import load_tokenizers

    models = build_random_models(SDXL, "tiny", seed=0)
    conditioner = TextConditioner(SDXL, load_tokenizers(SDXL), models.text_encoders)
    cache = tec.TextEncoderOutputCache(conditioner, BESIDE_IMAGES)
    image = str(tmp_path / "a.png")
    cache.ensure([tec.TextSample("a red car", image), tec.TextSample("a red car", image)])
    batch = cache.get_batch(["a red car"], [image])
    with torch.no_grad():
        direct = conditioner.encode(["a red car"])
    assert batch.context.shape == (1, 77, 64) and batch.pooled.shape == (1, 32)
    torch.testing.assert_close(batch.pooled, direct.pooled, rtol=1e-5, atol=1e-6)
    assert os.path.isdir(tmp_path / CACHE_FOLDER / tec.TEXT_KIND)


def test_text_cache_blockers(tmp_path):
    from library.data.config import load_dataset_config

    def config(**subset):
        path = tmp_path / "c.toml"
        lines = ["[[datasets]]", "resolution = 64", "[[datasets.subsets]]", f"image_dir = '{tmp_path}'"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in subset.items()]
        path.write_text("\n".join(lines))
        return load_dataset_config(str(path), None)

    tec.check_text_encoder_caching(config(caption_prefix="x"))
    with pytest.raises(UserError, match="shuffle_caption"):
        tec.check_text_encoder_caching(config(shuffle_caption=True))
    with pytest.raises(UserError, match="enable_wildcard"):
        tec.check_text_encoder_caching(config(enable_wildcard=True))
    with pytest.raises(UserError, match="frozen"):
        tec.check_text_encoder_caching(config(), train_text_encoder=True)
    subset = config(caption_prefix="masterpiece", secondary_separator=";;").datasets[0].subsets[0]
    assert tec.fixed_caption("a;;b\nsecond line", subset) == "masterpiece a,b"


# --- tools --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dreambooth(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("db")
    folder = root / "train" / "2_sks thing"
    paths = write_images(folder, photos)
    for path in paths:
        with open(os.path.splitext(path)[0] + ".caption", "w", encoding="utf-8") as f:
            f.write(f"a photo of {os.path.basename(path)[:-4]}")
    return root


DATASET_FLAGS = ["--resolution", "128", "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "256",
                 "--caption_extension", ".caption"]


def test_cache_latents_tool_fills_the_cache_a_run_finds(dreambooth, tiny_checkpoint):
    model = tiny_checkpoint("sd1")
    train = str(dreambooth / "train")
    cache_dir = str(dreambooth / "latent_cache")
    command = [sys.executable, os.path.join(ROOT, "tools", "cache_latents.py"), "--pretrained_model_name_or_path", model,
               "--train_data_dir", train, "--flip_aug", "--vae_batch_size", "4", "--cache_dir", cache_dir] + DATASET_FLAGS
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "8 samples, 0 cached, 8 encoded" in result.stdout

    # What a training run does: same config, same VAE, looked up through the library.
    import argparse

    from library.data.config import load_dataset_config
    from library.data.flags import add_dataset_arguments

    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    args = parser.parse_args(["--train_data_dir", train, "--flip_aug"] + DATASET_FLAGS)
    items = collect_cache_items(load_dataset_config(None, args))
    samples = latent_samples_of(items)
    assert len(samples) == 8
    vae = load_vae_for_caching(model, SD1)
    cache = lc.LatentCache(vae, SD1, cache_dir)
    cache.release_vae()  # any miss would now raise
    stats = cache.ensure(samples)
    assert (stats.hits, stats.encoded) == (8, 0)
    assert cache.get(samples[0]).shape == (4, *(side // 8 for side in samples[0].plan.bucket[::-1]))


def test_cache_text_encoder_outputs_tool(dreambooth, tiny_checkpoint, capsys):
    from tools import cache_text_encoder_outputs as tool

    model = tiny_checkpoint("sd1")
    argv = ["--pretrained_model_name_or_path", model, "--train_data_dir", str(dreambooth / "train"),
            "--caption_prefix", "best", "--clip_skip", "2"] + DATASET_FLAGS
    tool.main(argv)
    assert "4 entries, 0 cached, 4 encoded" in capsys.readouterr().out
    folder = dreambooth / "train" / "2_sks thing" / CACHE_FOLDER / tec.TEXT_KIND
    files = [f for _, _, names in os.walk(folder) for f in names]
    assert len(files) == 4
    tool.main(argv)
    assert "4 entries, 4 cached, 0 encoded" in capsys.readouterr().out
    with pytest.raises(UserError, match="shuffle_caption"):
        tool.main(argv + ["--shuffle_caption"])


def test_prepare_buckets_latents_writes_metadata_and_latents(dreambooth, tiny_checkpoint, tmp_path):
    from finetune import prepare_buckets_latents as tool

    model = tiny_checkpoint("sd1")
    folder = str(dreambooth / "train" / "2_sks thing")
    in_json, out_json = tmp_path / "in.json", tmp_path / "out.json"
    in_json.write_text(json.dumps({"astronaut": {"caption": "an astronaut"}}))
    cache_dir = str(tmp_path / "cache")
    tool.main([folder, str(in_json), str(out_json), model, "--max_resolution", "128,128", "--min_bucket_reso", "64",
               "--max_bucket_reso", "256", "--bucket_reso_steps", "32", "--batch_size", "2", "--flip_aug",
               "--cache_dir", cache_dir])
    metadata = json.loads(out_json.read_text())
    assert sorted(metadata) == ["astronaut", "chelsea", "coffee", "rocket"]
    assert metadata["astronaut"]["caption"] == "an astronaut"
    assert metadata["astronaut"]["image_size"] == [160, 160]
    # 128x128 area, steps 32: the square photo keeps the square bucket, 160x107 (AR 1.50) goes to 160x96 (AR 1.67).
    assert metadata["astronaut"]["train_resolution"] == [128, 128] and metadata["coffee"]["train_resolution"] == [160, 96]

    # A fine-tuning run reading OUT_JSON finds every latent.
    import argparse

    from library.data.config import load_dataset_config
    from library.data.flags import add_dataset_arguments

    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    args = parser.parse_args(["--in_json", str(out_json), "--train_data_dir", folder, "--resolution", "128",
                              "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "256",
                              "--bucket_reso_steps", "32", "--flip_aug"])
    samples = latent_samples_of(collect_cache_items(load_dataset_config(None, args)))
    cache = lc.LatentCache(load_vae_for_caching(model, SD1), SD1, cache_dir)
    stats = cache.ensure(samples)
    assert (stats.unique, stats.hits, stats.encoded) == (8, 8, 0)
