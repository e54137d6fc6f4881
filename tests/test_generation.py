"""Image generation: samplers, seeds, guidance, weighting, img2img/inpaint/highres, LoRA, textual
inversion, PNG metadata, prompt options and the gen_img command line, on tiny random models."""

import io
import json
import logging
import os
import sys

import pytest
import torch

from library.errors import UserError
from library.models.families import SD1, SDXL
from library.generation.engine import BatchSettings, GenerationEngine, HighresFix, ImageJob
from library.models.random_models import build_random_models
from library.text.tokenizer import load_tokenizers

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "sd-scripts")
SMALL = BatchSettings(64, 64, steps=3, sampler="euler")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def tiny(family, seed=0):
    return build_random_models(family, "tiny", seed), load_tokenizers(family)


@pytest.fixture(scope="module")
def sd1():
    return tiny(SD1)


@pytest.fixture(scope="module")
def sd1_engine(sd1):
    return GenerationEngine(*sd1, "cpu")


@pytest.fixture(scope="module")
def sdxl_engine():
    return GenerationEngine(*tiny(SDXL), "cpu")


def latents(engine, jobs, settings=SMALL):
    return engine.generate(jobs, settings, output="latent")


# --- samplers and schedulers ------------------------------------------------------------------

@pytest.mark.parametrize("name", __import__("library.generation.samplers", fromlist=["x"]).ALL_SAMPLERS)
def test_every_sampler_gives_finite_images(sd1_engine, name):
    images = sd1_engine.generate([ImageJob("a red cat", "blurry", 3)], BatchSettings(64, 64, steps=3, sampler=name))
    pixels = torch.tensor(list(images[0].getdata()), dtype=torch.float32)
    assert images[0].size == (64, 64)
    assert pixels.std() > 1.0  # not a constant image


def test_scheduler_settings():
    from library.generation.samplers import canonical_name, make_scheduler

    ddim = make_scheduler("ddim", v_parameterization=True)
    assert (ddim.config.clip_sample, ddim.config.steps_offset, ddim.config.prediction_type) == (False, 1, "v_prediction")
    assert make_scheduler("ddim", zero_steps_offset=True).config.steps_offset == 0
    assert "steps_offset" not in make_scheduler("dpmsingle").config
    assert type(make_scheduler("k_dpm_2_a")).__name__ == "KDPM2AncestralDiscreteScheduler"
    assert make_scheduler("dpmsolver").config.algorithm_type == "dpmsolver"
    assert canonical_name("K_EULER_A") == "euler_a"
    with pytest.raises(UserError, match="unknown sampler"):
        canonical_name("plms")


@pytest.mark.parametrize("name", ["ddim", "euler_a", "lms", "dpmsingle"])
def test_zero_terminal_snr_schedule(sd1, name):
    from library.generation.samplers import make_scheduler

    scheduler = make_scheduler(name, zero_terminal_snr=True)
    assert float(scheduler.alphas_cumprod[-1]) < 1e-6  # SNR at t=999 is (almost) zero
    assert float(scheduler.alphas_cumprod[0]) == pytest.approx(1 - 0.00085, rel=1e-4)  # first step unchanged
    engine = GenerationEngine(*sd1, "cpu", zero_terminal_snr=True)
    assert torch.isfinite(latents(engine, [ImageJob("a cat", "", 1)], BatchSettings(64, 64, steps=3, sampler=name))).all()


# --- seeds, guidance, weighting -----------------------------------------------------------------

def test_same_seed_same_image_batched_or_not(sd1_engine):
    settings = BatchSettings(64, 64, steps=3, sampler="euler_a")  # ancestral: noise at every step too
    jobs = [ImageJob("a cat", "dog", 11), ImageJob("a house", "", 12)]
    batched = latents(sd1_engine, jobs, settings)
    alone = torch.cat([latents(sd1_engine, [job], settings) for job in jobs])
    assert torch.allclose(batched, alone, atol=1e-3 * batched.abs().max())
    other = latents(sd1_engine, [ImageJob("a cat", "dog", 13)], settings)
    assert not torch.allclose(other[0], batched[0], atol=1e-2)


def test_negative_scale(sd1_engine, sdxl_engine):
    # ns = 0 leaves plain CFG around the *empty* prompt: same as no ns with an empty negative prompt
    plain_empty = latents(sd1_engine, [ImageJob("a cat", "", 5)])
    ns_zero = latents(sd1_engine, [ImageJob("a cat", "dog", 5)], BatchSettings(64, 64, steps=3, sampler="euler",
                                                                                negative_scale=0.0))
    assert torch.allclose(ns_zero, plain_empty, atol=1e-4 * plain_empty.abs().max())
    settings = BatchSettings(64, 64, steps=3, sampler="euler", negative_scale=3.0)
    with_ns = latents(sd1_engine, [ImageJob("a cat", "dog", 5)], settings)
    assert not torch.allclose(with_ns, plain_empty, atol=1e-2)
    assert torch.isfinite(latents(sdxl_engine, [ImageJob("a cat", "dog", 5)], settings)).all()


def test_weighting_changes_conditioning_as_specified(sd1):
    engine = GenerationEngine(*sd1, "cpu", emb_normalize_mode="none")
    plain, _, _ = engine.encode(["a cat sat"], [""])
    weighted, _, _ = engine.encode(["a (cat:1.5) sat"], [""])
    # BOS, "a", "cat", "sat": only the "cat" state is multiplied
    assert torch.allclose(weighted.context[0, 2], plain.context[0, 2] * 1.5, atol=1e-5)
    assert torch.allclose(weighted.context[0, :2], plain.context[0, :2])
    assert torch.allclose(weighted.context[0, 3:], plain.context[0, 3:])
    restored, _, _ = GenerationEngine(*sd1, "cpu").encode(["a (cat:1.5) sat"], [""])  # "original" restores the mean
    assert restored.context.mean().item() == pytest.approx(plain.context.mean().item(), rel=1e-4)
    long_prompt = " ".join(["cat"] * 100)
    engine.max_embeddings_multiples = 2
    cond, uncond, _ = engine.encode([long_prompt], ["dog"])
    assert cond.context.shape[1] == uncond.context.shape[1] == 154  # 2 chunks of 77, shared by the negative


def test_sdxl_size_conditioning_changes_the_image(sdxl_engine):
    job = [ImageJob("a cat", "", 4)]
    base = latents(sdxl_engine, job)
    sized = latents(sdxl_engine, job, BatchSettings(64, 64, steps=3, sampler="euler", original_size=(2048, 512)))
    cropped = latents(sdxl_engine, job, BatchSettings(64, 64, steps=3, sampler="euler", crop=(32, 0)))
    assert not torch.allclose(base, sized, atol=1e-3)
    assert not torch.allclose(base, cropped, atol=1e-3)


# --- img2img, inpainting, highres fix ---------------------------------------------------------

def _init_images():
    from PIL import Image

    red, blue = Image.new("RGB", (64, 64), (220, 20, 20)), Image.new("RGB", (64, 64), (20, 20, 220))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    return red, blue, mask


@pytest.mark.parametrize("engine_name", ["sd1_engine", "sdxl_engine"])
def test_img2img_inpaint_and_highres_run(request, engine_name):
    engine = request.getfixturevalue(engine_name)
    red, blue, mask = _init_images()
    settings = BatchSettings(64, 64, steps=4, strength=0.5, sampler="ddim")
    from_red = latents(engine, [ImageJob("a cat", "", 2, init_image=red)], settings)
    from_blue = latents(engine, [ImageJob("a cat", "", 2, init_image=blue)], settings)
    assert not torch.allclose(from_red, from_blue, atol=1e-3)  # the source image matters
    inpainted = engine.generate([ImageJob("a cat", "", 2, init_image=red, mask_image=mask)], settings)
    assert inpainted[0].size == (64, 64)
    first, final = engine.generate_highres([ImageJob("a cat", "", 2)], BatchSettings(128, 96, steps=2), HighresFix(0.5, 2))
    assert first[0].size == (64, 64) and final[0].size == (128, 96)  # first pass floored to 32 px
    first, final = engine.generate_highres([ImageJob("a cat", "", 2)], BatchSettings(128, 128, steps=2),
                                           HighresFix(0.5, 2, latents_upscaling=True))
    assert first is None and final[0].size == (128, 128)


# --- LoRA ----------------------------------------------------------------------------------------

def _make_lora(models, path, seed):
    from networks import lora

    network = lora.create_network(1.0, 4, 4, models.vae, models.text_encoders, models.unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    network.save_weights(str(path), None, {})
    return str(path)


def _network_args(files, muls=None, merge=False):
    from types import SimpleNamespace

    return SimpleNamespace(network_module=["networks.lora"] * len(files), network_weights=list(files),
                           network_mul=muls, network_args=None, network_show_meta=False, network_merge=merge,
                           network_merge_n_models=None, network_pre_calc=False)


def test_lora_multiplier_zero_is_the_base_image_and_two_loras_combine(tmp_path):
    from library.generation.loading import load_networks

    models, tokenizers = tiny(SD1, seed=1)
    base = latents(GenerationEngine(models, tokenizers, "cpu"), [ImageJob("a cat", "dog", 3)])
    files = [_make_lora(models, tmp_path / "a.safetensors", 1), _make_lora(models, tmp_path / "b.safetensors", 2)]
    networks, muls = load_networks(_network_args(files), models, torch.float32, torch.device("cpu"))
    engine = GenerationEngine(models, tokenizers, "cpu", networks=networks, network_default_muls=muls)
    job = [ImageJob("a cat", "dog", 3)]

    def run(*muls):
        return latents(engine, job, BatchSettings(64, 64, steps=3, sampler="euler", network_muls=muls))

    assert torch.allclose(run(0.0, 0.0), base, atol=1e-5)
    only_a, only_b, both = run(1.0, 0.0), run(0.0, 1.0), run(1.0, 1.0)
    for a, b in [(only_a, base), (only_b, base), (both, only_a), (both, only_b)]:
        assert not torch.allclose(a, b, atol=1e-3)
    assert torch.allclose(latents(engine, job), both, atol=1e-5)  # default multipliers 1.0
    for network in networks:
        network.unapply()


def test_lora_merge_matches_dynamic_application(tmp_path):
    from library.generation.loading import load_networks

    models, tokenizers = tiny(SD1, seed=2)
    file = _make_lora(models, tmp_path / "m.safetensors", 3)
    job = [ImageJob("a cat", "", 8)]
    networks, muls = load_networks(_network_args([file], [0.7]), models, torch.float32, torch.device("cpu"))
    dynamic = latents(GenerationEngine(models, tokenizers, "cpu", networks=networks, network_default_muls=muls), job)
    networks[0].unapply()
    merged_models, _ = tiny(SD1, seed=2)
    assert load_networks(_network_args([file], [0.7], merge=True), merged_models, torch.float32,
                         torch.device("cpu")) == ([], [])
    merged = latents(GenerationEngine(merged_models, tokenizers, "cpu"), job)
    assert torch.allclose(merged, dynamic, atol=1e-3 * dynamic.abs().max())


def test_lora_of_another_model_is_refused(tmp_path, sd1):
    from library.generation.loading import load_networks

    real_sd15 = os.path.join(FIXTURES, "lora_sd15_lierla_dim4.safetensors")
    models, _ = tiny(SD1, seed=3)
    with pytest.raises(UserError, match="lora_sd15_lierla_dim4.safetensors"):
        load_networks(_network_args([real_sd15]), models, torch.float32, torch.device("cpu"))
    sd1_lora = _make_lora(sd1[0], tmp_path / "sd1.safetensors", 4)
    xl_models, _ = tiny(SDXL)
    with pytest.raises(UserError, match="sd1.safetensors: "):
        load_networks(_network_args([sd1_lora]), xl_models, torch.float32, torch.device("cpu"))


# --- textual inversion ---------------------------------------------------------------------------

def _fixture_layout(name):
    path = os.path.join(FIXTURES, name)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _save_like_fixture(layout, path, widths, seed=0):
    """A tiny-model embedding with the fixture's keys, vector counts, dtype and metadata."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {key: torch.randn(shape[0], widths[key], generator=generator)
               for key, (shape, _dtype) in layout["tensors"].items()}
    save_file(tensors, str(path), layout["metadata"])
    return tensors


@pytest.mark.parametrize("form", ["sd-scripts", "sd-scripts-pt", "a1111"])
def test_textual_inversion_changes_only_prompts_with_the_token(tmp_path, form):
    from library.generation.loading import load_textual_inversion

    models, tokenizers = tiny(SD1)
    engine = GenerationEngine(models, tokenizers, "cpu")
    before_plain, _, _ = engine.encode(["a photo of a cat"], [""])
    layout = _fixture_layout("ti_sd15_2vec.keys.json")
    path = tmp_path / "sksobj.safetensors"
    vectors = _save_like_fixture(layout, path, {"emb_params": 32})["emb_params"]
    if form == "sd-scripts-pt":
        path = tmp_path / "sksobj.pt"
        torch.save({"emb_params": vectors}, path)
    elif form == "a1111":
        path = tmp_path / "sksobj.pt"
        torch.save({"string_to_param": {"*": torch.nn.Parameter(vectors)}, "name": "sksobj", "step": 10}, path)
    expand = load_textual_inversion([str(path)], SD1, tokenizers, models.text_encoders)
    assert expand("a photo of sksobj") == "a photo of sksobj sksobj1"  # 2 vectors: the token expands
    ids = tokenizers[0].convert_tokens_to_ids(["sksobj", "sksobj1"])
    assert torch.equal(models.text_encoders[0].get_input_embeddings().weight[ids], vectors)
    engine.expand_prompt = expand
    after_plain, _, _ = engine.encode(["a photo of a cat"], [""])
    assert torch.equal(after_plain.context, before_plain.context)
    with_token, _, _ = engine.encode(["a photo of sksobj"], [""])
    models.text_encoders[0].get_input_embeddings().weight.data[ids] += 1.0
    changed, _, _ = engine.encode(["a photo of sksobj"], [""])
    assert not torch.allclose(with_token.context, changed.context)


def test_textual_inversion_sdxl_and_mismatches(tmp_path):
    from library.generation.loading import load_textual_inversion

    models, tokenizers = tiny(SDXL)
    layout = _fixture_layout("ti_sdxl_2vec.keys.json")
    tensors = _save_like_fixture(layout, tmp_path / "xlobj.safetensors", {"clip_l": 32, "clip_g": 32})
    expand = load_textual_inversion([str(tmp_path / "xlobj.safetensors")], SDXL, tokenizers, models.text_encoders)
    assert expand("XLOBJ style") == "xlobj xlobj1 style"
    for tokenizer, encoder, key in zip(tokenizers, models.text_encoders, ("clip_l", "clip_g")):
        ids = tokenizer.convert_tokens_to_ids(["xlobj", "xlobj1"])
        assert torch.equal(encoder.get_input_embeddings().weight[ids], tensors[key])
    with pytest.raises(UserError, match="already in the tokenizer"):
        load_textual_inversion([str(tmp_path / "xlobj.safetensors")], SDXL, tokenizers, models.text_encoders)
    sd_file = tmp_path / "sdobj.safetensors"
    _save_like_fixture(_fixture_layout("ti_sd15_2vec.keys.json"), sd_file, {"emb_params": 32})
    with pytest.raises(UserError, match="sdobj.safetensors: not an SDXL embedding"):
        load_textual_inversion([str(sd_file)], SDXL, tokenizers, models.text_encoders)
    sd_models, sd_tokenizers = tiny(SD1)
    with pytest.raises(UserError, match="xlobj.safetensors: is an SDXL embedding"):
        load_textual_inversion([str(tmp_path / "xlobj.safetensors")], SD1, sd_tokenizers, sd_models.text_encoders)
    real = os.path.join(FIXTURES, "ti_sd15_2vec.safetensors")  # 768 wide: full-size SD1.5
    with pytest.raises(UserError, match="ti_sd15_2vec.safetensors: its vectors are 768 wide, but this model.s text encoder takes 32-wide"):
        load_textual_inversion([real], SD1, sd_tokenizers, sd_models.text_encoders)


# --- PNG metadata and prompt options -----------------------------------------------------------

def test_png_parameters_round_trip(tmp_path):
    from PIL import Image

    from library.generation.png_info import format_parameters, parse_parameters, read_png_info, save_png

    info = dict(prompt="a, (cat:1.2)\nsecond line", negative_prompt='ugly: bad, "x"', steps=20, sampler="euler_a",
                scale=7.5, negative_scale=2.5, seed=4294967295, width=512, height=768, strength=0.6, clip_skip=2,
                original_width=1024, original_height=2048, crop_top=0, crop_left=16, model="my model, v2")
    text = format_parameters(info)
    assert text.splitlines()[-1].startswith("Steps: 20, Sampler: euler_a, CFG scale: 7.5, Negative scale: 2.5, Seed: ")
    assert "Size: 512x768" in text
    assert parse_parameters(text) == info
    path = str(tmp_path / "x.png")
    save_png(Image.new("RGB", (8, 8)), path, info)
    assert read_png_info(path) == info
    stored = Image.open(path).text
    assert (stored["prompt"], stored["seed"], stored["negative-prompt"]) == (info["prompt"], "4294967295",
                                                                             info["negative_prompt"])
    a1111 = "masterpiece\nNegative prompt: lowres\nSteps: 28, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, Size: 512x512"
    assert parse_parameters(a1111)["sampler"] == "DPM++ 2M" and parse_parameters(a1111)["negative_prompt"] == "lowres"


def test_prompt_line_options(caplog):
    from library.generation.prompt_options import parse_prompt_line

    parsed = parse_prompt_line("a cat, (red:1.2) --n blurry, bad --W 768 --h 512 --s 2000 --d 1,2 --l 5.5 --nl none "
                               "--t 0.4 --am 0.5,1 --ss k_euler --ow 1024 --ct 8 --f name.png")
    assert parsed == {"prompt": "a cat, (red:1.2)", "negative_prompt": "blurry, bad", "width": 768, "height": 512,
                      "sample_steps": 1000, "seeds": [1, 2], "scale": 5.5, "negative_scale": None, "strength": 0.4,
                      "network_muls": [0.5, 1.0], "sample_sampler": "k_euler", "original_width": 1024, "crop_top": 8,
                      "filename": "name.png"}
    with caplog.at_level(logging.WARNING):
        assert parse_prompt_line("x --w wide --zz 1 --dsd1 3") == {"prompt": "x"}
    assert "--w wide" in caplog.text and "--zz 1" in caplog.text and "--dsd1 is not supported" in caplog.text


def test_prompt_files(tmp_path):
    from library.generation.prompt_options import load_prompt_file

    (tmp_path / "p.txt").write_text("# comment\na cat --d 3\n\n  a dog --n cat\n", encoding="utf-8")
    assert load_prompt_file(str(tmp_path / "p.txt")) == [
        {"prompt": "a cat", "seeds": [3], "enum": 0}, {"prompt": "a dog", "negative_prompt": "cat", "enum": 1}]
    (tmp_path / "p.toml").write_text('[prompt]\nwidth = 640\nsample_steps = 20\n[[prompt.subset]]\nprompt = "a"\n'
                                     '[[prompt.subset]]\nprompt = "b"\nwidth = 512\nseed = 9\n', encoding="utf-8")
    assert load_prompt_file(str(tmp_path / "p.toml")) == [
        {"prompt": "a", "width": 640, "sample_steps": 20, "enum": 0},
        {"prompt": "b", "width": 512, "sample_steps": 20, "seeds": [9], "enum": 1}]
    (tmp_path / "p.json").write_text(json.dumps(["x --w 64", {"prompt": "y", "scale": 3}]), encoding="utf-8")
    assert load_prompt_file(str(tmp_path / "p.json")) == [
        {"prompt": "x", "width": 64, "enum": 0}, {"prompt": "y", "scale": 3, "enum": 1}]
    (tmp_path / "typed.json").write_text(json.dumps([{"prompt": "y", "width": "wide"}]), encoding="utf-8")
    with pytest.raises(UserError, match="typed.json \\(prompt 1\\): width must be a whole number"):
        load_prompt_file(str(tmp_path / "typed.json"))
    (tmp_path / "bad.toml").write_text("[prompt\n", encoding="utf-8")
    with pytest.raises(UserError, match="bad.toml: not valid TOML"):
        load_prompt_file(str(tmp_path / "bad.toml"))
    with pytest.raises(UserError, match="missing.txt: prompt file not found"):
        load_prompt_file(str(tmp_path / "missing.txt"))


# --- the command line --------------------------------------------------------------------------

def _gen_img(argv):
    import gen_img  # the repository root is on sys.path (conftest)

    return gen_img.main(argv)


def test_gen_img_command_line(tmp_path, tiny_checkpoint, caplog, monkeypatch):
    from PIL import Image

    from library.generation.png_info import read_png_info

    ckpt = tiny_checkpoint("sd1")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert _gen_img(["--ckpt", ckpt, "--outdir", str(out), "--prompt", "a {red|blue} cat --n dog --d 5,6 --w 72",
                         "--H", "64", "--steps", "2", "--sampler", "k_euler_a", "--images_per_prompt", "2",
                         "--batch_size", "2", "--sequential_file_name", "--fp16"]) == 0
    assert caplog.text.count("--fp16 needs CUDA") == 1
    assert sorted(os.listdir(out)) == ["im_000001.png", "im_000002.png"]
    info = read_png_info(str(out / "im_000001.png"))
    assert info["prompt"] in ("a red cat", "a blue cat") and info["seed"] == 5 and info["negative_prompt"] == "dog"
    assert (info["width"], info["height"], info["steps"], info["sampler"]) == (72, 64, 2, "k_euler_a")
    assert Image.open(out / "im_000002.png").size == (72, 64)

    # img2img without a prompt takes the source's own prompt; names follow the source file
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert _gen_img(["--ckpt", ckpt, "--outdir", str(tmp_path / "i2i"), "--image_path", str(out / "im_000001.png"),
                     "--steps", "2", "--strength", "0.5", "--use_original_file_name", "--seed", "3"]) == 0
    info = read_png_info(str(tmp_path / "i2i" / "im_000001.png"))
    assert (info["prompt"], info["negative_prompt"], info["strength"], info["seed"]) == (
        read_png_info(str(out / "im_000001.png"))["prompt"], "dog", 0.5, 3)

    # interactive: prompts from stdin until EOF
    monkeypatch.setattr(sys, "stdin", io.StringIO("a cat --d 7 --w 64 --h 64\n\na dog --d 8 --w 64 --h 64\n"))
    assert _gen_img(["--ckpt", ckpt, "--outdir", str(tmp_path / "inter"), "--interactive", "--steps", "2"]) == 0
    seeds = sorted(read_png_info(str(tmp_path / "inter" / f))["seed"] for f in os.listdir(tmp_path / "inter"))
    assert seeds == [7, 8]


def test_gen_img_refuses_bad_input(tmp_path, tiny_checkpoint):
    ckpt = tiny_checkpoint("sd1")
    with pytest.raises(UserError, match="--control_net_models: ControlNet is not supported"):
        _gen_img(["--ckpt", ckpt, "--prompt", "x", "--control_net_models", "cn.safetensors"])
    with pytest.raises(UserError, match="no such file"):
        _gen_img(["--ckpt", str(tmp_path / "nope.safetensors"), "--prompt", "x"])
    with pytest.raises(UserError, match="--v1 was given but the file is a Stable Diffusion XL"):
        _gen_img(["--ckpt", tiny_checkpoint("sdxl"), "--prompt", "x", "--v1", "--outdir", str(tmp_path)])
    import sdxl_gen_img

    with pytest.raises(UserError, match="needs SDXL"):
        sdxl_gen_img.main(["--ckpt", ckpt, "--prompt", "x", "--outdir", str(tmp_path)])



def test_gen_img_diffusers_is_the_same_generator(tmp_path, tiny_checkpoint):
    """sd-scripts' older name: the same options give the same image, and the script runs as one."""
    import subprocess

    import numpy as np
    from PIL import Image

    import gen_img_diffusers

    ckpt = tiny_checkpoint("sd1")
    common = ["--ckpt", ckpt, "--prompt", "a red cat --n dog", "--W", "64", "--H", "64", "--steps", "2",
              "--sampler", "euler_a", "--seed", "11", "--sequential_file_name"]
    assert _gen_img(common + ["--outdir", str(tmp_path / "new")]) == 0
    assert gen_img_diffusers.main(common + ["--outdir", str(tmp_path / "old")]) == 0
    new = np.asarray(Image.open(tmp_path / "new" / "im_000001.png"))
    old = np.asarray(Image.open(tmp_path / "old" / "im_000001.png"))
    assert new.shape == (64, 64, 3) and np.array_equal(new, old)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "gen_img_diffusers.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--ckpt" in done.stdout and "--network_weights" in done.stdout
