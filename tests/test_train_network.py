"""train_network.py end to end on a tiny model and the bundled photos."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from library.models import safetensors_io
from library.caching.store import CACHE_FOLDER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry"]


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """A DreamBooth folder `4_subject` with six photos of different aspect ratios and captions."""
    import skimage.data

    root = tmp_path_factory.mktemp("data")
    folder = root / "4_subject"
    folder.mkdir()
    for i, name in enumerate(PHOTOS):
        array = getattr(skimage.data, name)()
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        image = Image.fromarray(array[..., :3])
        w, h = image.size
        crops = [(0, 0, w, h), (0, 0, w, h * 2 // 3), (0, 0, w * 2 // 3, h)]
        image = image.crop(crops[i % 3]).resize((96 + 32 * (i % 2), 96))
        image.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a photo of {name}", encoding="utf-8")
    return str(root)


def train_args(model, data, out, *extra):
    return [
        "--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
        "--output_name", "lora", "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "64",
        "--max_bucket_reso", "128", "--bucket_reso_steps", "64", "--train_batch_size", "2", "--caption_extension", ".txt",
        "--network_module", "networks.lora", "--network_dim", "4", "--learning_rate", "1e-3", "--seed", "7",
        "--max_data_loader_n_workers", "0", *extra,
    ]


def run_training(args):
    from library.training.script_parsers import network_parser
    from library.training.task_network import NetworkTask
    from library.training.train_args import parse_args
    from library.training.trainer import train

    parsed = parse_args(network_parser(sdxl=False, description=""), args)
    return train(parsed, NetworkTask(sdxl=False))


def test_lora_trains_and_saves_fixture_layout(tiny_checkpoint, photo_dir, tmp_path, fixtures_dir):
    out = str(tmp_path / "out")
    run = run_training(train_args(tiny_checkpoint("sd1"), photo_dir, out, "--max_train_steps", "6",
                                  "--network_args", "conv_dim=2", "conv_alpha=1"))
    path = os.path.join(out, "lora.safetensors")
    assert os.path.isfile(path)
    tensors = safetensors_io.load_tensors(path)
    metadata = safetensors_io.read_metadata(path)
    fixture = json.load(open(os.path.join(fixtures_dir, "sd-scripts", "lora_sd15_c3lier_dim4_conv4.keys.json")))
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    fixture_names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in fixture["tensors"]}
    assert names == fixture_names  # same modules as sd-scripts' C3Lier file, tiny widths
    missing_meta = set(fixture["metadata"]) - set(metadata)
    assert not missing_meta, sorted(missing_meta)
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_steps"] == "6" and metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert run.seed == 7


def test_kill_and_resume_gives_the_same_weights(tiny_checkpoint, photo_dir, tmp_path):
    model = tiny_checkpoint("sd1")
    straight = str(tmp_path / "straight")
    run_training(train_args(model, photo_dir, straight, "--max_train_steps", "6"))
    first = str(tmp_path / "first")
    run_training(train_args(model, photo_dir, first, "--max_train_steps", "6", "--save_every_n_steps", "4",
                            "--save_state"))
    state = os.path.join(first, "lora-step00000004-state")
    assert os.path.isdir(state)
    resumed = str(tmp_path / "resumed")
    run_training(train_args(model, photo_dir, resumed, "--max_train_steps", "6", "--resume", state))
    a = safetensors_io.load_tensors(os.path.join(straight, "lora.safetensors"))
    b = safetensors_io.load_tensors(os.path.join(resumed, "lora.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6
    changed = max(float(a[k].abs().max()) for k in a if "lora_up" in k)
    assert changed > 0  # training moved the up weights away from their zero init


def fixed_losses(run, task, n_batches=6):
    """Loss on the first batches of epoch 1 with fixed noise and timesteps."""
    from library.training.run import step_generator
    from library.training.step_loss import micro_step_loss

    batches = run.dataset.epoch_batches(1)
    out = []
    with torch.no_grad():
        for k in range(min(n_batches, len(batches))):
            batch = run.dataset.load_batch(batches[k], 1, 0)
            out.append(float(micro_step_loss(run, task, batch, step_generator(123, k, 0, run.device))))
    return sum(out) / len(out)


def test_loss_falls_on_the_bundled_photos(tiny_checkpoint, photo_dir, tmp_path):
    run = run_training(train_args(tiny_checkpoint("sd1"), photo_dir, str(tmp_path / "o"), "--max_train_steps", "30",
                                  "--cache_latents", "--learning_rate", "3e-3"))
    task = run.extra["task"]
    trained = fixed_losses(run, task)
    task.network.set_multiplier(0.0)  # the base model: the LoRA starts as a no-op
    base = fixed_losses(run, task)
    assert trained < base * 0.97, (trained, base)


def test_sdxl_lora_with_cached_text_encoder_outputs(tiny_checkpoint, photo_dir, tmp_path, fixtures_dir):
    from library.training.script_parsers import network_parser
    from library.training.task_network import NetworkTask
    from library.training.train_args import parse_args
    from library.training.trainer import train

    out = str(tmp_path / "xl")
    args = train_args(tiny_checkpoint("sdxl"), photo_dir, out, "--max_train_steps", "3", "--cache_latents",
                      "--cache_text_encoder_outputs", "--network_train_unet_only")
    args[args.index("--bucket_reso_steps") + 1] = "32"
    train(parse_args(network_parser(sdxl=True, description=""), args), NetworkTask(sdxl=True))
    tensors = safetensors_io.load_tensors(os.path.join(out, "lora.safetensors"))
    fixture = json.load(open(os.path.join(fixtures_dir, "sd-scripts", "lora_sdxl_unet_only_dim4.keys.json")))
    assert set(tensors) == set(fixture["tensors"])  # SGM U-Net names, every module sd-scripts trains
    meta = safetensors_io.read_metadata(os.path.join(out, "lora.safetensors"))
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"


def test_third_party_plugin_lycoris_lokr(tiny_checkpoint, photo_dir, tmp_path):
    pytest.importorskip("lycoris", reason="lycoris-lora is an optional dependency")
    out = str(tmp_path / "lokr")
    run_training(train_args(tiny_checkpoint("sd1"), photo_dir, out, "--max_train_steps", "2",
                            "--network_module", "lycoris.kohya", "--network_args", "algo=lokr", "factor=4"))
    tensors = safetensors_io.load_tensors(os.path.join(out, "lora.safetensors"))
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lokr_") for k in tensors)
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_proj_in.lokr_") for k in tensors)
    meta = safetensors_io.read_metadata(os.path.join(out, "lora.safetensors"))
    assert meta["ss_network_module"] == "lycoris.kohya"


def test_latents_cached_on_first_use_train_like_latents_cached_before(tiny_checkpoint, photo_dir, tmp_path):
    """--cache_latents_on_first_use: the first step comes before most images are encoded; the cache
    fills as batches need them (in the main process, also with loader workers), is completed after the
    first epoch (flipped twins included), and the run trains exactly as with the cache filled first."""
    model = tiny_checkpoint("sd1")
    data = str(tmp_path / "data")  # a copy: other tests leave disk caches in photo_dir
    shutil.copytree(photo_dir, data, ignore=shutil.ignore_patterns(CACHE_FOLDER))
    photo_dir = data
    common = ("--flip_aug", "--max_data_loader_n_workers", "2", "--optimizer_type", "SGDNesterov")
    eager = run_training(train_args(model, photo_dir, str(tmp_path / "eager"), "--max_train_steps", "1",
                                    "--cache_latents", *common))
    per_epoch = eager.steps_per_epoch
    samples = eager.dataset.latent_cache_samples()
    assert len(samples) == 2 * len(PHOTOS)  # each photo, and mirrored

    out = str(tmp_path / "first_step")
    run = run_training(train_args(model, photo_dir, out, "--max_train_steps", "1", "--cache_latents_to_disk",
                                  "--cache_latents_on_first_use", *common))
    assert run.models.vae is not None  # the first epoch is not over: more images to encode
    files = [f for _, _, names in os.walk(photo_dir) for f in names if f.endswith(".safetensors")]
    assert len(files) == 2  # one batch of two images: only those were encoded
    shutil.rmtree(os.path.join(photo_dir, "4_subject", CACHE_FOLDER))

    eager = run_training(train_args(model, photo_dir, str(tmp_path / "eager"), "--max_train_steps",
                                    str(per_epoch + 2), "--cache_latents", *common))
    lazy = run_training(train_args(model, photo_dir, str(tmp_path / "lazy"), "--max_train_steps",
                                   str(per_epoch + 2), "--cache_latents_on_first_use", *common))
    assert lazy.models.vae is None  # released once the first epoch completed the cache
    assert all(sample in lazy.latent_cache for sample in samples)
    assert lazy.latent_cache.stats.encoded == len(samples)  # each entry encoded once
    # the batches' encodes landed in this process's cache: completing it after epoch 1 found them
    assert lazy.latent_cache.stats.hits >= len(PHOTOS)
    a = safetensors_io.load_tensors(str(tmp_path / "eager" / "lora.safetensors"))
    b = safetensors_io.load_tensors(str(tmp_path / "lazy" / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in b.items() if "lora_up" in k)


def test_vae_released_after_caching_and_read_again_on_a_miss(tiny_checkpoint, photo_dir, tmp_path):
    model = tiny_checkpoint("sd1")
    run = run_training(train_args(model, photo_dir, str(tmp_path / "o"), "--max_train_steps", "2",
                                  "--cache_latents_to_disk"))
    assert run.models.vae is None  # nothing samples images and a LoRA file holds no VAE
    cache = run.latent_cache
    sample = run.dataset.latent_cache_samples()[0]
    path = cache.entry_path(sample)
    before = cache.get(sample).clone()
    os.remove(path)  # a lost entry: the VAE is read from the checkpoint again and re-encodes it
    again = cache.get(sample)
    assert os.path.isfile(path)
    assert torch.equal(again, before)
    assert cache.vae is None  # the re-read VAE is dropped again once the entry is written

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo --w 64 --h 64 --s 2\n", encoding="utf-8")
    run = run_training(train_args(model, photo_dir, str(tmp_path / "s"), "--max_train_steps", "1", "--cache_latents",
                                  "--sample_prompts", str(prompts), "--sample_every_n_steps", "1"))
    assert run.models.vae is not None  # sample images decode with it
    assert os.listdir(os.path.join(str(tmp_path / "s"), "sample"))


def test_modules_the_forward_skips_are_left_alone(tiny_checkpoint, photo_dir, tmp_path):
    """With --clip_skip 2 the text encoder's last layer is never run: its LoRA modules get no
    gradient, and the optimizer must not touch them (no weight decay), whatever the learning rate."""
    model = tiny_checkpoint("sd1")
    saved = {}
    for lr in ("1e-2", "1e-3"):
        out = str(tmp_path / lr)
        run_training(train_args(model, photo_dir, out, "--max_train_steps", "2", "--clip_skip", "2",
                                "--learning_rate", lr, "--optimizer_args", "weight_decay=0.5"))
        saved[lr] = safetensors_io.load_tensors(os.path.join(out, "lora.safetensors"))
    layers = {int(m.group(1)) for k in saved["1e-2"] for m in [re.search(r"encoder_layers_(\d+)_", k)] if m}
    last = f"lora_te_text_model_encoder_layers_{max(layers)}_"
    skipped = [k for k in saved["1e-2"] if k.startswith(last) and k.endswith(".weight")]
    used = [k for k in saved["1e-2"] if k.startswith("lora_unet_") and "lora_down" in k]
    assert skipped and used
    for k in skipped:
        assert torch.equal(saved["1e-2"][k], saved["1e-3"][k]), k
    assert any(not torch.equal(saved["1e-2"][k], saved["1e-3"][k]) for k in used)
