"""--debug_dataset: the batches a run would train on, written as images and captions; nothing trained."""

import os

import numpy as np
import pytest
import skimage.data
from PIL import Image

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]


@pytest.fixture(scope="module")
def rgba_photos(tmp_path_factory):
    """Four 64x64 RGBA photos whose left half is transparent, captions "name, b, c, d"."""
    root = tmp_path_factory.mktemp("debug_data")
    folder = root / "1_subject"
    folder.mkdir()
    for name in PHOTOS:
        rgb = np.asarray(Image.fromarray(getattr(skimage.data, name)()[..., :3]).resize((64, 64)))
        alpha = np.full((64, 64, 1), 255, np.uint8)
        alpha[:, :32] = 0
        Image.fromarray(np.concatenate([rgb, alpha], axis=-1), mode="RGBA").save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"{name}, b, c, d", encoding="utf-8")
    return root


def _run(model, data, out, *extra):
    from train_network import main

    return main(["--pretrained_model_name_or_path", model, "--train_data_dir", str(data), "--output_dir", str(out),
                 "--resolution", "64", "--train_batch_size", "2", "--caption_extension", ".txt", "--seed", "5",
                 "--network_module", "networks.lora", "--max_data_loader_n_workers", "0", "--debug_dataset", *extra])


def test_debug_dataset_writes_what_the_model_would_see(tmp_path, tiny_checkpoint, rgba_photos):
    out = tmp_path / "out"
    status = _run(tiny_checkpoint("sd1"), rgba_photos, out, "--max_train_steps", "3", "--flip_aug", "--alpha_mask",
                  "--shuffle_caption", "--keep_tokens", "1")
    assert status == 0
    (folder,) = os.listdir(out)  # nothing else: no model, no state
    assert folder.startswith("debug_dataset-")
    batches = sorted(os.listdir(out / folder))
    # 4 images in batches of 2: two batches per epoch, the third step is epoch 2's first batch
    assert batches == ["001-000001-0", "001-000002-0", "002-000003-0"]
    seen_flipped = False
    for batch in batches:
        files = sorted(os.listdir(out / folder / batch))
        stems = sorted({f[:-4] for f in files if f.endswith(".txt")})
        assert len(stems) == 2
        for stem in stems:
            name = stem.split("-")[1]
            flipped = stem.endswith("-flipped")
            seen_flipped |= flipped
            source = Image.open(rgba_photos / "1_subject" / f"{name}.png")
            expected_rgb = np.asarray(source.convert("RGB"))
            expected_alpha = np.asarray(source)[..., 3]
            if flipped:
                expected_rgb, expected_alpha = expected_rgb[:, ::-1], expected_alpha[:, ::-1]
            image = np.asarray(Image.open(out / folder / batch / f"{stem}.png"))
            mask = np.asarray(Image.open(out / folder / batch / f"{stem}-mask.png"))
            assert image.shape == (64, 64, 3) and np.array_equal(image, expected_rgb)  # 64x64 bucket: no resize
            assert np.array_equal(mask, expected_alpha)
            caption = (out / folder / batch / f"{stem}.txt").read_text(encoding="utf-8")
            tokens = caption.split(", ")
            assert tokens[0] == name and sorted(tokens[1:]) == ["b", "c", "d"]  # keep_tokens 1, the rest shuffled
    assert seen_flipped


def test_debug_dataset_loads_no_model_even_with_latent_caching(tmp_path, tiny_checkpoint, rgba_photos, monkeypatch):
    from library.models import loading

    def no_model(*args, **kwargs):
        raise AssertionError("--debug_dataset loaded a model")

    monkeypatch.setattr(loading, "load_models", no_model)
    out = tmp_path / "out"
    assert _run(tiny_checkpoint("sd1"), rgba_photos, out, "--max_train_epochs", "1", "--cache_latents") == 0
    (folder,) = os.listdir(out)
    assert sorted(os.listdir(out / folder)) == ["001-000001-0", "001-000002-0"]
