"""Masked loss from mask images (`conditioning_data_dir` + `--masked_loss`), with and without latent caches.

The loss is checked against the U-Net's own prediction and the step's noise, with the mask applied by
hand: sd-scripts multiplies the element-wise loss by the mask's red channel (area-resized to latent
size) and still divides by the full area.
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image

SIZE = 64  # one 64x64 image, no bucketing: the crop is the whole image, latents are 8x8


@pytest.fixture
def mask_dataset(tmp_path):
    import skimage.data

    images, masks = tmp_path / "img", tmp_path / "mask"
    images.mkdir()
    masks.mkdir()
    Image.fromarray(skimage.data.astronaut()).resize((SIZE, SIZE)).save(images / "astronaut.png")
    (images / "astronaut.txt").write_text("a photo of an astronaut", encoding="utf-8")
    config = tmp_path / "data.toml"
    config.write_text(
        f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = {SIZE}\nbatch_size = 1\n'
        f'[[datasets.subsets]]\nimage_dir = "{images}"\nconditioning_data_dir = "{masks}"\n', encoding="utf-8")
    return tmp_path, str(config), masks / "astronaut.png"


def write_mask(path, left: int, right: int) -> None:
    """Mask image: red channel `left` on the left half, `right` on the right half (green/blue opposite,
    so only the red channel can make the test pass)."""
    mask = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    mask[:, : SIZE // 2, 0], mask[:, SIZE // 2 :, 0] = left, right
    mask[..., 1:] = 255 - mask[..., :1]
    Image.fromarray(mask).save(path)


def prepared_run(model, config, out, *extra):
    from library.training.script_parsers import network_parser
    from library.training.task_network import NetworkTask
    from library.training.train_args import parse_args
    from library.training.trainer import prepare_run

    args = parse_args(network_parser(sdxl=False, description=""), [
        "--pretrained_model_name_or_path", model, "--dataset_config", config, "--output_dir", out,
        "--network_module", "networks.lora", "--network_dim", "4", "--max_train_steps", "2", "--seed", "3",
        "--masked_loss", *extra])
    task = NetworkTask(sdxl=False)
    return prepare_run(args, task), task


def step_loss_and_parts(run, task):
    """(our loss, U-Net prediction, the step's noise) for the first batch."""
    from library.training.run import step_generator
    from library.training.step_loss import micro_step_loss

    batch = run.dataset.load_batch(run.dataset.epoch_batches(1)[0], 1, 0)
    seen = {}

    def keep(module, inputs, out):
        seen["pred"] = out.sample.detach()

    hook = run.models.unet.register_forward_hook(keep)
    try:
        with torch.no_grad():
            loss = micro_step_loss(run, task, batch, step_generator(run.seed, 0, 0, run.device))
    finally:
        hook.remove()
    # the step's ε: the first draw of the step's generator (timesteps come after it)
    noise = torch.randn(tuple(seen["pred"].shape), generator=step_generator(run.seed, 0, 0, run.device))
    return float(loss), seen["pred"].float(), noise, batch


@pytest.mark.parametrize("cache", [None, "--cache_latents", "--cache_latents_to_disk"])
def test_black_mask_gives_zero_loss_and_half_mask_the_unmasked_half(tiny_checkpoint, mask_dataset, cache):
    root, config, mask_path = mask_dataset
    model = tiny_checkpoint("sd1")
    extra = [cache] if cache else []

    write_mask(mask_path, 0, 0)
    run, task = prepared_run(model, config, str(root / "out-black"), *extra)
    loss, pred, noise, batch = step_loss_and_parts(run, task)
    assert ("latents" in batch) == bool(cache) and "conditioning_images" in batch
    assert loss == 0.0
    assert float(((pred - noise) ** 2).mean()) > 0.1  # the same step without a mask is far from 0

    write_mask(mask_path, 255, 0)
    run, task = prepared_run(model, config, str(root / "out-half"), *extra)
    loss, pred, noise, batch = step_loss_and_parts(run, task)
    squared = (pred - noise) ** 2
    expected = float(squared[..., : SIZE // 16].sum() / squared.numel())  # left 4 of 8 latent columns, full-area mean
    assert loss == pytest.approx(expected, rel=1e-5)
    assert float(squared[..., SIZE // 16 :].sum()) > 0  # the right half did have a loss to hide


def test_mask_is_cached_with_the_latents_and_a_changed_mask_is_noticed(tiny_checkpoint, mask_dataset):
    from library.caching.store import CACHE_FOLDER
    from library.models.safetensors_io import load_tensors

    root, config, mask_path = mask_dataset
    model = tiny_checkpoint("sd1")
    write_mask(mask_path, 255, 0)
    run, task = prepared_run(model, config, str(root / "a"), "--cache_latents_to_disk", "--flip_aug")
    entries = [os.path.join(d, f) for d, _, files in os.walk(root / "img" / CACHE_FOLDER) for f in files
               if f.endswith(".safetensors")]
    assert len(entries) == 2  # the image and its mirror image
    stored = [load_tensors(e)["conditioning"] for e in entries]
    assert all(s.shape == (3, SIZE, SIZE) and s.dtype == torch.uint8 for s in stored)
    reds = sorted(int(s[0, 0, 0]) for s in stored)
    assert reds == [0, 255]  # flipped with its image: white on the left in one, on the right in the other

    # the mask comes from the cache: the file is not read again while the entry is valid
    batch = run.dataset.load_batch(run.dataset.epoch_batches(1)[0], 1, 0)
    first = batch["conditioning_images"].clone()
    write_mask(mask_path, 0, 0)
    run, task = prepared_run(model, config, str(root / "b"), "--cache_latents_to_disk", "--flip_aug")
    assert run.latent_cache.stats.encoded == 2  # a new mask: new entries, not the stale ones
    batch = run.dataset.load_batch(run.dataset.epoch_batches(1)[0], 1, 0)
    assert float(batch["conditioning_images"][:, 0].max()) == -1.0 and float(first[:, 0].max()) == 1.0
    loss, _, _, _ = step_loss_and_parts(run, task)
    assert loss == 0.0


def test_alpha_masks_still_weight_the_loss(tiny_checkpoint, tmp_path):
    import skimage.data

    images = tmp_path / "img"
    images.mkdir()
    rgb = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((SIZE, SIZE)))
    alpha = np.zeros((SIZE, SIZE), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha])).save(images / "astronaut.png")
    (images / "astronaut.txt").write_text("an astronaut", encoding="utf-8")
    config = tmp_path / "data.toml"
    config.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = {SIZE}\n'
                      f'[[datasets.subsets]]\nimage_dir = "{images}"\nalpha_mask = true\n', encoding="utf-8")
    run, task = prepared_run(tiny_checkpoint("sd1"), str(config), str(tmp_path / "out"), "--cache_latents")
    loss, _, _, batch = step_loss_and_parts(run, task)
    assert "alpha_masks" in batch and "conditioning_images" not in batch
    assert loss == 0.0  # a fully transparent image trains nothing


def test_cache_tool_fills_the_entries_masked_training_reads(tiny_checkpoint, mask_dataset):
    from tools import cache_latents

    root, config, mask_path = mask_dataset
    model = tiny_checkpoint("sd1")
    write_mask(mask_path, 255, 0)
    cache_latents.main(["--pretrained_model_name_or_path", model, "--dataset_config", config, "--masked_loss",
                        "--flip_aug"])
    run, _ = prepared_run(model, config, str(root / "out"), "--cache_latents_to_disk", "--flip_aug")
    assert (run.latent_cache.stats.hits, run.latent_cache.stats.encoded) == (2, 0)


def test_masks_from_the_command_line_with_dreambooth_folders(tiny_checkpoint, tmp_path):
    """--train_data_dir with `<repeats>_<name>` folders and --conditioning_data_dir: masks by base name."""
    import skimage.data

    from library.errors import UserError
    from library.training.script_parsers import network_parser
    from library.training.task_network import NetworkTask
    from library.training.train_args import parse_args
    from library.training.trainer import prepare_run

    folder, masks = tmp_path / "img" / "2_astronaut", tmp_path / "masks"
    folder.mkdir(parents=True)
    masks.mkdir()
    Image.fromarray(skimage.data.astronaut()).resize((SIZE, SIZE)).save(folder / "astronaut.png")
    (folder / "astronaut.txt").write_text("an astronaut", encoding="utf-8")
    write_mask(masks / "astronaut.png", 0, 0)
    argv = ["--pretrained_model_name_or_path", tiny_checkpoint("sd1"), "--train_data_dir", str(tmp_path / "img"),
            "--conditioning_data_dir", str(masks), "--resolution", str(SIZE), "--caption_extension", ".txt",
            "--output_dir", str(tmp_path / "out"), "--network_module", "networks.lora", "--max_train_steps", "1"]
    task = NetworkTask(sdxl=False)
    run = prepare_run(parse_args(network_parser(sdxl=False, description=""), argv + ["--masked_loss"]), task)
    assert len(run.dataset) == 1 and run.dataset.num_batches() == 2  # 2 repeats
    loss, _, _, batch = step_loss_and_parts(run, task)
    assert batch["captions"] == ["an astronaut"] and loss == 0.0
    with pytest.raises(UserError, match="^--conditioning_data_dir: mask images are used with --masked_loss"):
        prepare_run(parse_args(network_parser(sdxl=False, description=""), argv), NetworkTask(sdxl=False))
