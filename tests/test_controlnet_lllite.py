"""ControlNet-LLLite: module layout against sd-scripts' file, files written by hand, generation with it."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import UserError
from library.models.families import SDXL
from library.models.random_models import build_random_models
from library.text.tokenizer import load_tokenizers

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "sd-scripts",
                       "controlnet_lllite_sdxl.keys.json")
# the tiny SDXL U-Net's channel widths where LLLite attaches (block_out_channels 32, 64, 96)
TINY_WIDTH = {"input_blocks_4": 64, "input_blocks_5": 64, "input_blocks_7": 96, "input_blocks_8": 96,
              "middle_block_1": 96}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def fixture_tensors():
    return json.load(open(FIXTURE, encoding="utf-8"))["tensors"]


def module_names(keys):
    return {k.split(".")[0] for k in keys}


def test_full_size_sdxl_gives_sd_scripts_keys_and_shapes():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from library.models import unet_convert
    from networks.control_net_lllite import ControlNetLLLite

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_convert.unet_config(SDXL, "full"))
    with torch.device("meta"):
        network = ControlNetLLLite(unet, cond_emb_dim=32, mlp_dim=64)
    ours = {k: list(v.shape) for k, v in network.state_dict().items()}
    theirs = {k: shape for k, (shape, _) in fixture_tensors().items()}
    assert len(network.unet_modules) == 136
    assert ours == theirs  # 1600 tensors: every key and shape of sd-scripts' file


def hand_written_file(path, cond_emb_dim=8, mlp_dim=6, seed=0, width_scale=1):
    """An sd-scripts-layout LLLite file for the tiny SDXL U-Net, written from the spec alone: the
    fixture's module names, depth by block, shapes from the widths, random values with non-zero `up`."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in sorted(module_names(fixture_tensors())):
        path_part = name[len("lllite_unet_"):]
        block = "_".join(path_part.split("_")[:3]) if path_part.startswith("input") else "middle_block_1"
        width = TINY_WIDTH[block] * width_scale
        index = int(path_part.split("_")[2]) if path_part.startswith("input") else 9
        depth = 2 if index <= 5 else 3
        half = cond_emb_dim // 2
        convs = [(half, 3, 4)] + ([(cond_emb_dim, half, 4)] if depth == 2 else [(half, half, 4), (cond_emb_dim, half, 2)])
        shapes = {f"conditioning1.{2 * i}.weight": [o, c, k, k] for i, (o, c, k) in enumerate(convs)}
        shapes.update({f"conditioning1.{2 * i}.bias": [o] for i, (o, _, _) in enumerate(convs)})
        shapes.update({"down.0.weight": [mlp_dim, width], "down.0.bias": [mlp_dim],
                       "mid.0.weight": [mlp_dim, mlp_dim + cond_emb_dim], "mid.0.bias": [mlp_dim],
                       "up.0.weight": [width, mlp_dim], "up.0.bias": [width]})
        for key, shape in shapes.items():
            tensors[f"{name}.{key}"] = torch.randn(shape, generator=generator) * 0.2
    save_file(tensors, str(path), metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/control-net-lllite"})
    return tensors


@pytest.fixture(scope="module")
def sdxl():
    return build_random_models(SDXL, "tiny", 0), load_tokenizers(SDXL)


def test_tiny_sdxl_has_the_same_modules_and_a_hand_written_file_loads(sdxl, tmp_path):
    from networks.control_net_lllite import ControlNetLLLite, load_lllite

    models, _ = sdxl
    network = ControlNetLLLite(models.unet, 8, 6)
    assert module_names(network.state_dict()) == module_names(fixture_tensors())  # the same 136 names
    assert all(float(m.up[0].weight.detach().abs().max()) == 0 for m in network.unet_modules)  # up starts at 0
    written = hand_written_file(tmp_path / "hand.safetensors")
    loaded = load_lllite(str(tmp_path / "hand.safetensors"), models.unet)
    try:
        state = loaded.state_dict()
        assert state.keys() == written.keys()
        assert all(torch.equal(state[k], written[k]) for k in written)
        assert (loaded.cond_emb_dim, loaded.mlp_dim) == (8, 6)  # read from the file, as sd-scripts does
    finally:
        loaded.unapply()


def test_control_goes_into_the_input_of_q_k_v(sdxl):
    """y = Linear(x + up(mid(cat[cond_emb, down(x)])) * multiplier), against the formula by hand."""
    from networks.control_net_lllite import ControlNetLLLite

    models, _ = sdxl
    network = ControlNetLLLite(models.unet, 8, 6, multiplier=0.7)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.2)
    module = next(m for m in network.unet_modules if m.lllite_name.endswith("input_blocks_4_1_transformer_blocks_0_attn1_to_k"))
    layer = module.org_module
    network.apply_to()
    try:
        hint = torch.rand(2, 3, 64, 64) * 2 - 1
        network.set_cond_image(hint)
        x = torch.randn(4, 16, layer.in_features)  # CFG: twice the hint batch, 16 = (64/16)² positions
        with torch.no_grad():
            got = layer(x)
            emb = module.conditioning1[2](torch.relu(module.conditioning1[0](hint)))  # depth 2: 1/16 of the image
            emb = emb.flatten(2).transpose(1, 2).repeat(2, 1, 1)
            down = torch.relu(x @ module.down[0].weight.T + module.down[0].bias)
            mid = torch.relu(torch.cat([emb, down], 2) @ module.mid[0].weight.T + module.mid[0].bias)
            control = (mid @ module.up[0].weight.T + module.up[0].bias) * 0.7
            want = torch.nn.functional.linear(x + control, layer.weight, layer.bias)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        network.set_cond_image(None)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    finally:
        network.unapply()


def test_frozen_half_layers_take_the_control_like_plain_ones(sdxl):
    import copy

    from library.models.frozen_weights import hold_in_half
    from networks.control_net_lllite import ControlNetLLLite

    models, _ = sdxl
    unet = copy.deepcopy(models.unet).half().float()  # values a half-precision file holds
    held = copy.deepcopy(unet)
    held.requires_grad_(False)
    hold_in_half(held, torch.float32)
    outputs = []
    for u in (unet, held):
        torch.manual_seed(0)
        network = ControlNetLLLite(u, 8, 6)
        with torch.no_grad():
            for p in network.parameters():
                p.normal_(0, 0.2)
        network.apply_to()
        network.set_cond_image(torch.rand(1, 3, 64, 64) * 2 - 1)
        with torch.no_grad():
            outputs.append(u(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), 500,
                             torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(2)),
                             added_cond_kwargs={"text_embeds": torch.zeros(1, 32),
                                                "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}).sample)
    assert any(type(m).__module__.endswith("frozen_weights") for m in held.modules())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)


# --- generation -------------------------------------------------------------------------------


def guide(path, seed=0):
    rng = np.random.default_rng(seed)
    edges = np.zeros((64, 64, 3), dtype=np.uint8)
    edges[rng.integers(0, 64, 40), rng.integers(0, 64, 40)] = 255
    edges[20:44, 30] = 255
    Image.fromarray(edges).save(path)
    image = Image.open(path)
    image.filename = str(path)
    return image


def test_generation_multiplier_zero_is_the_base_image_and_seeds_repeat(sdxl, tmp_path):
    from library.generation.control import ControlNet
    from library.generation.engine import BatchSettings, GenerationEngine, ImageJob
    from networks.control_net_lllite import load_lllite

    models, tokenizers = sdxl
    hand_written_file(tmp_path / "hand.safetensors")
    network = load_lllite(str(tmp_path / "hand.safetensors"), models.unet)
    try:
        hint = guide(tmp_path / "hint.png")
        settings = BatchSettings(64, 64, steps=3, sampler="euler")

        def latents(multiplier, ratio=1.0, seed=4, hints=(hint,)):
            engine = GenerationEngine(models, tokenizers, "cpu", control_nets=[ControlNet(network, multiplier, ratio)])
            return engine.generate([ImageJob("a cat", "", seed, guide_images=hints)], settings, output="latent")

        base = GenerationEngine(models, tokenizers, "cpu").generate([ImageJob("a cat", "", 4)], settings,
                                                                     output="latent")
        assert torch.equal(latents(0.0), base)
        controlled = latents(1.0)
        assert not torch.allclose(controlled, base, atol=1e-3)
        assert torch.equal(latents(1.0), controlled)  # same seed, same image
        assert not torch.allclose(latents(1.0, seed=5), controlled, atol=1e-3)
        half = latents(1.0, ratio=0.5)  # steers the first steps only
        assert not torch.allclose(half, controlled, atol=1e-4) and not torch.allclose(half, base, atol=1e-4)
        assert torch.equal(latents(1.0, hints=()), base)  # no guide image: no control
        assert all(m.cond_emb is None for m in network.unet_modules)  # hints dropped after each batch
    finally:
        network.unapply()


def _gen(module_name, argv):
    module = __import__(module_name)
    return module.main(argv)


def test_sdxl_gen_img_with_two_lllite_models_and_a_lora(tmp_path, tiny_checkpoint):
    from library.generation.png_info import read_png_info
    from library.models.loading import load_models
    from networks import lora

    ckpt = tiny_checkpoint("sdxl")
    models = load_models(ckpt)
    hand_written_file(tmp_path / "a.safetensors", seed=1)
    hand_written_file(tmp_path / "b.safetensors", seed=2)
    network = lora.create_network(1.0, 4, 4, models.vae, models.text_encoders, models.unet)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.2)
    network.save_weights(str(tmp_path / "lora.safetensors"), None, {})
    guides = tmp_path / "guides"
    guides.mkdir()
    for i in range(2):
        guide(guides / f"{i}.png", seed=i)
    common = ["--ckpt", ckpt, "--prompt", "a cat", "--W", "64", "--H", "64", "--steps", "2", "--sampler", "euler",
              "--seed", "9", "--sequential_file_name"]
    assert _gen("sdxl_gen_img", common + ["--outdir", str(tmp_path / "base")]) == 0
    control = ["--control_net_lllite_models", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
               "--guide_image_path", str(guides), "--control_net_multipliers", "1.0", "0.5",
               "--control_net_ratios", "1.0", "0.5", "--network_module", "networks.lora",
               "--network_weights", str(tmp_path / "lora.safetensors")]
    assert _gen("gen_img", common + ["--outdir", str(tmp_path / "both")] + control) == 0
    info = read_png_info(str(tmp_path / "both" / "im_000001.png"))
    assert info["control_nets"] == "a:1:1, b:0.5:0.5" and info["guide_images"] == "0.png, 1.png"
    assert info["networks"] == "lora:1.0"
    pixels = [np.asarray(Image.open(tmp_path / d / "im_000001.png"), dtype=np.float32) for d in ("base", "both")]
    assert np.abs(pixels[0] - pixels[1]).mean() > 1.0


def test_bad_control_input_is_one_line(tmp_path, tiny_checkpoint):
    sdxl_ckpt, sd1_ckpt = tiny_checkpoint("sdxl"), tiny_checkpoint("sd1")
    hand_written_file(tmp_path / "a.safetensors")
    hint = tmp_path / "hint.png"
    guide(hint)
    base = ["--prompt", "x", "--steps", "1", "--outdir", str(tmp_path / "o")]
    cases = [
        (["--ckpt", sdxl_ckpt, "--control_net_lllite_models", str(tmp_path / "a.safetensors")],
         "--control_net_lllite_models needs --guide_image_path"),
        (["--ckpt", sdxl_ckpt, "--guide_image_path", str(hint)], "--guide_image_path: guide images are used by"),
        (["--ckpt", sd1_ckpt, "--control_net_lllite_models", str(tmp_path / "a.safetensors"), "--guide_image_path",
          str(hint)], "SDXL models only"),
        (["--ckpt", sdxl_ckpt, "--control_net_lllite_models", str(tmp_path / "a.safetensors"), "--guide_image_path",
          str(hint), "--W", "72", "--H", "64"], "multiples of 32"),
        (["--ckpt", sdxl_ckpt, "--control_net_lllite_models", str(tmp_path / "missing.safetensors"),
          "--guide_image_path", str(hint)], "missing.safetensors: ControlNet-LLLite file not found"),
        (["--ckpt", sdxl_ckpt, "--control_net_lllite_models", str(tmp_path / "a.safetensors"), "--guide_image_path",
          str(hint), "--control_net_ratios", "1.5"], "--control_net_ratios 1.5"),
    ]
    wide = tmp_path / "wide.safetensors"  # made for a U-Net twice as wide
    hand_written_file(wide, width_scale=2)
    from safetensors.torch import save_file

    cases.append((["--ckpt", sdxl_ckpt, "--control_net_lllite_models", str(wide), "--guide_image_path", str(hint)],
                  "wide.safetensors: .* has shape"))
    lora_file = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(lora_file))
    cases.append((["--ckpt", sdxl_ckpt, "--control_net_lllite_models", str(lora_file), "--guide_image_path",
                   str(hint)], "not a ControlNet-LLLite file"))
    for argv, message in cases:
        with pytest.raises(UserError, match=message) as caught:
            _gen("gen_img", argv + base)
        assert "\n" not in str(caught.value)


def test_guide_image_groups():
    from library.generation.control import guide_groups

    assert guide_groups(["a"], 2) == [("a", "a")]
    assert guide_groups(["a", "b", "c", "d"], 2) == [("a", "b"), ("c", "d")]
    assert guide_groups(["a", "b"], 1) == [("a",), ("b",)]
    with pytest.raises(UserError, match="3 guide images for 2 LLLite models"):
        guide_groups(["a", "b", "c"], 2)


def test_canny_tool_matches_opencv_and_pairs_folders(tmp_path):
    import cv2
    import skimage.data

    from tools import canny

    images = tmp_path / "img"
    images.mkdir()
    photo = skimage.data.astronaut()[::4, ::4]
    Image.fromarray(photo).save(images / "astronaut.png")
    Image.fromarray(skimage.data.chelsea()[::4, ::4]).save(images / "cat.jpg")
    assert canny.main(["--input", str(images), "--output", str(tmp_path / "hints"), "--thres1", "50"]) == 0
    assert sorted(os.listdir(tmp_path / "hints")) == ["astronaut.png", "cat.png"]
    edges = np.asarray(Image.open(tmp_path / "hints" / "astronaut.png"))
    gray = cv2.cvtColor(cv2.imread(str(images / "astronaut.png")), cv2.COLOR_BGR2GRAY)  # sd-scripts' reading
    assert edges.shape == photo.shape[:2] and set(np.unique(edges)) == {0, 255}
    assert np.array_equal(edges, cv2.Canny(gray, 50, 224))
    with pytest.raises(UserError, match="--input and --output are required"):
        canny.main(["--input", str(images)])
    with pytest.raises(UserError, match="no such file or folder"):
        canny.main(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "x")])
