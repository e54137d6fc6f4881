"""Training-time sample images: prompt files, file names, PNG text, a dynamically applied LoRA,
and leaving the training state (modes, RNG) as it was."""

import logging
import os
import re
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from library.models.families import SD1, SDXL
from library.generation.png_info import read_png_info
from library.models.random_models import build_random_models
from library.generation.sampling import sample_file_name, sample_images
from library.text.tokenizer import load_tokenizers


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def make_run(family, output_name="run", **args):
    models = build_random_models(family, "tiny", 0)
    run_args = SimpleNamespace(output_name=output_name, clip_skip=None, zero_terminal_snr=False, **args)
    return SimpleNamespace(args=run_args, models=models, tokenizers=load_tokenizers(family), device=torch.device("cpu"))


@pytest.fixture(scope="module")
def sd1_run():
    return make_run(SD1)


def test_sample_file_names():
    assert sample_file_name("run", 120, None, 3, 42, "20260101120000") == "run_000120_03_20260101120000_42.png"
    assert sample_file_name(None, 120, 2, 0, None, "20260101120000") == "e000002_00_20260101120000.png"


def test_samples_from_a_text_file(tmp_path, sd1_run):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# samples\na red cat --w 75 --h 64 --d 7 --s 3 --l 5 --n blurry --ss euler_a\n"
                       "a dog --w 64 --h 60 --s 2\n", encoding="utf-8")
    paths = sample_images(sd1_run, 10, None, str(prompts), "ddim", str(tmp_path))
    names = [os.path.basename(p) for p in paths]
    assert re.fullmatch(r"run_000010_00_\d{14}_7\.png", names[0])
    assert re.fullmatch(r"run_000010_01_\d{14}\.png", names[1])  # no seed given: random, not in the name
    assert all(os.path.dirname(p) == str(tmp_path / "sample") for p in paths)
    assert Image.open(paths[0]).size == (72, 64) and Image.open(paths[1]).size == (64, 64)  # floored to ×8, ≥ 64
    first, second = read_png_info(paths[0]), read_png_info(paths[1])
    assert (first["prompt"], first["negative_prompt"], first["seed"], first["steps"], first["scale"], first["sampler"]) \
        == ("a red cat", "blurry", 7, 3, 5.0, "euler_a")
    assert (second["prompt"], second["steps"], second["scale"], second["sampler"]) == ("a dog", 2, 7.5, "ddim")
    assert isinstance(second["seed"], int)


def test_sample_seed_reproduces_and_epoch_names(tmp_path, sd1_run):
    prompts = tmp_path / "p.json"
    prompts.write_text('[{"prompt": "a cat", "seed": 3, "sample_steps": 2, "width": 64, "height": 64}]', encoding="utf-8")
    a = sample_images(sd1_run, 5, 2, str(prompts), "euler_a", str(tmp_path / "a"))
    b = sample_images(sd1_run, 6, None, str(prompts), "euler_a", str(tmp_path / "b"))
    assert re.fullmatch(r"run_e000002_00_\d{14}_3\.png", os.path.basename(a[0]))
    assert list(Image.open(a[0]).getdata()) == list(Image.open(b[0]).getdata())


def test_samples_with_a_trained_lora_keep_the_training_state(tmp_path):
    from networks import lora

    run = make_run(SD1, output_name=None)
    models = run.models
    network = lora.create_network(1.0, 4, 4, models.vae, models.text_encoders, models.unet)
    network.apply_to(models.text_encoders, models.unet)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.3)
    network.train()
    models.unet.train()
    prompts = tmp_path / "p.toml"
    prompts.write_text('[prompt]\nsample_steps = 2\nwidth = 64\nheight = 64\n[[prompt.subset]]\nprompt = "a cat"\n'
                       'seed = 11\n', encoding="utf-8")
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    with_lora = sample_images(run, 1, None, str(prompts), "ddim", str(tmp_path / "on"), networks=[network])
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert network.training and models.unet.training and not models.vae.training
    network.set_multiplier(0.0)
    without = sample_images(run, 1, None, str(prompts), "ddim", str(tmp_path / "off"), networks=[network])
    network.unapply()
    base = sample_images(run, 1, None, str(prompts), "ddim", str(tmp_path / "base"))
    pixels = [torch.tensor(list(Image.open(p[0]).getdata()), dtype=torch.float32) for p in (with_lora, without, base)]
    assert torch.equal(pixels[1], pixels[2])  # multiplier 0 = the base model
    assert (pixels[0] - pixels[2]).abs().mean() > 1.0  # the LoRA is used as it stands


def test_sdxl_samples_and_replacements(tmp_path):
    run = make_run(SDXL)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of sks --n sks blurry --d 1 --s 2 --w 64 --h 64\n", encoding="utf-8")
    paths = sample_images(run, 0, None, str(prompts), "k_dpm_2_a", str(tmp_path), replacements={"sks": "sks sks1"})
    info = read_png_info(paths[0])
    assert (info["prompt"], info["negative_prompt"], info["sampler"]) == ("a photo of sks sks1", "sks sks1 blurry",
                                                                         "k_dpm_2_a")
    assert (info["original_width"], info["original_height"], info["crop_top"]) == (64, 64, 0)


def test_missing_or_bad_prompt_files_do_not_stop_training(tmp_path, sd1_run, caplog):
    with caplog.at_level(logging.ERROR):
        assert sample_images(sd1_run, 1, None, str(tmp_path / "none.txt"), "ddim", str(tmp_path)) == []
        (tmp_path / "bad.json").write_text("{", encoding="utf-8")
        assert sample_images(sd1_run, 1, None, str(tmp_path / "bad.json"), "ddim", str(tmp_path)) == []
    assert "none.txt not found" in caplog.text and "bad.json: not valid JSON" in caplog.text
    assert sample_images(sd1_run, 1, None, None, "ddim", str(tmp_path)) == []
    not_main = SimpleNamespace(**vars(sd1_run), is_main=False)
    (tmp_path / "ok.txt").write_text("a cat\n", encoding="utf-8")
    assert sample_images(not_main, 1, None, str(tmp_path / "ok.txt"), "ddim", str(tmp_path)) == []
