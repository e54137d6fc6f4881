"""U-Net / VAE conversion between original single files and diffusers, and the config builders.

Full-size models are only built on the meta device and compared key by key and shape by shape with
the fixtures of the real original checkpoints; numerical equivalence is checked on tiny models.
"""

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402

from library.models import families, unet_convert, vae_convert  # noqa: E402
from library.errors import UserError  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoint-keys"
CASES = [("sd15", families.SD1), ("sd21v", families.SD2), ("sdxl_base", families.SDXL)]
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def fixture_part(name: str, prefix: str) -> dict:
    keys = json.loads((FIXTURES / f"{name}.json").read_text())["keys"]
    return {k[len(prefix):]: tuple(s) for k, s in keys.items() if k.startswith(prefix)}


def meta_tensors(shapes: dict) -> dict:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def shapes_of(sd: dict) -> dict:
    return {k: tuple(t.shape) for k, t in sd.items()}


@pytest.fixture(scope="module")
def meta_models():
    models = {}
    for name, family in CASES:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**unet_convert.unet_config(family, "full"))
            vae = AutoencoderKL(**vae_convert.vae_config(family, "full"))
        models[name] = (unet.state_dict(), vae.state_dict())
    return models


# ------------------------------------------------------------------------------ full size, meta


@pytest.mark.parametrize("name,family", CASES, ids=[c[0] for c in CASES])
def test_full_unet_matches_original_layout(meta_models, name, family):
    diffusers_sd = meta_models[name][0]
    original = fixture_part(name, UNET_PREFIX)

    assert shapes_of(unet_convert.diffusers_to_ldm(diffusers_sd)) == original

    renamed = unet_convert.ldm_to_diffusers(meta_tensors(original))
    assert shapes_of(renamed) == shapes_of(diffusers_sd)
    assert unet_convert.infer_unet_config(renamed, family) == unet_convert.unet_config(family, "full")


@pytest.mark.parametrize("name,family", CASES, ids=[c[0] for c in CASES])
def test_full_vae_matches_original_layout(meta_models, name, family):
    diffusers_sd = meta_models[name][1]
    original = fixture_part(name, VAE_PREFIX)

    assert shapes_of(vae_convert.diffusers_to_ldm(diffusers_sd)) == original

    renamed = vae_convert.ldm_to_diffusers(meta_tensors(original))
    assert shapes_of(renamed) == shapes_of(diffusers_sd)
    assert renamed["encoder.mid_block.attentions.0.to_q.weight"].shape == (512, 512)
    assert vae_convert.infer_vae_config(renamed, family) == vae_convert.vae_config(family, "full")


def test_full_configs_match_reference_values():
    sd1 = unet_convert.unet_config(families.SD1, "full")
    assert sd1["attention_head_dim"] == 8 and sd1["cross_attention_dim"] == 768
    assert sd1["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert sd1["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert sd1["use_linear_projection"] is False and sd1["upcast_attention"] is False
    assert sd1["sample_size"] == 64 and sd1["layers_per_block"] == 2

    sd2 = unet_convert.unet_config(families.SD2, "full")
    assert sd2["attention_head_dim"] == [5, 10, 20, 20] and sd2["cross_attention_dim"] == 1024
    assert sd2["use_linear_projection"] is True and sd2["upcast_attention"] is True and sd2["sample_size"] == 96

    xl = unet_convert.unet_config(families.SDXL, "full")
    assert xl["attention_head_dim"] == [5, 10, 20] and xl["transformer_layers_per_block"] == [1, 2, 10]
    assert xl["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert xl["up_block_types"] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert (xl["addition_embed_type"], xl["addition_time_embed_dim"], xl["projection_class_embeddings_input_dim"]) \
        == ("text_time", 256, 2816)
    assert xl["sample_size"] == 128 and xl["cross_attention_dim"] == 2048

    assert [vae_convert.vae_config(f, "full")["sample_size"] for _, f in CASES] == [512, 768, 1024]
    assert [vae_convert.vae_config(f, "full")["scaling_factor"] for _, f in CASES] == [0.18215, 0.18215, 0.13025]


def test_sd2_conv_projection_and_inpainting_are_inferred():
    original = meta_tensors(fixture_part("sd21v", UNET_PREFIX))
    for key, t in list(original.items()):
        if key.endswith(("proj_in.weight", "proj_out.weight")):
            original[key] = torch.empty(*t.shape, 1, 1, device="meta")
    original["input_blocks.0.0.weight"] = torch.empty(320, 9, 3, 3, device="meta")
    config = unet_convert.infer_unet_config(unet_convert.ldm_to_diffusers(original), families.SD2)
    assert config["use_linear_projection"] is False
    assert config["in_channels"] == 9 and config["out_channels"] == 4


def test_sdxl_lora_module_names_map_both_ways(meta_models):
    pairs = unet_convert.module_prefix_pairs(unet_convert.unet_config(families.SDXL, "full"))
    examples = {
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q":
            "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
        "middle_block_1_proj_in": "mid_block_attentions_0_proj_in",
        "input_blocks_1_0_in_layers_2": "down_blocks_0_resnets_0_conv1",
        "input_blocks_3_0_op": "down_blocks_0_downsamplers_0_conv",
        "output_blocks_2_2_conv": "up_blocks_0_upsamplers_0_conv",
        "output_blocks_8_0_skip_connection": "up_blocks_2_resnets_2_conv_shortcut",
        "label_emb_0_0": "add_embedding_linear_1",
    }
    for sgm, diffusers_name in examples.items():
        assert unet_convert.ldm_module_to_diffusers(sgm, pairs, sep="_") == diffusers_name
        assert unet_convert.diffusers_module_to_ldm(diffusers_name, pairs, sep="_") == sgm

    # Every weight-bearing diffusers module maps to a module of the original file and back.
    original = fixture_part("sdxl_base", UNET_PREFIX)
    modules = {k.rpartition(".")[0] for k in meta_models["sdxl_base"][0] if k.endswith(".weight")}
    for module in modules:
        sgm = unet_convert.diffusers_module_to_ldm(module, pairs)
        assert f"{sgm}.weight" in original
        assert unet_convert.ldm_module_to_diffusers(sgm, pairs) == module
    with pytest.raises(UserError, match="input_blocks.99.1"):
        unet_convert.ldm_module_to_diffusers("input_blocks.99.1.proj_in", pairs)


def test_unknown_keys_are_rejected():
    original = meta_tensors(fixture_part("sd15", UNET_PREFIX))
    for bad in ("input_blocks.1.1.transformer_blocks.0.attn3.to_q.weight", "input_blocks.1.0.foo.weight",
                "time_embed.1.weight", "middle_block.3.weight", "something.weight"):
        with pytest.raises(UserError, match=bad.replace(".", r"\.")):
            unet_convert.ldm_to_diffusers({**original, bad: torch.empty(1, device="meta")})
    with pytest.raises(UserError, match="class_embedding"):
        diffusers_sd = unet_convert.ldm_to_diffusers(original)
        unet_convert.infer_unet_config({**diffusers_sd, "class_embedding.weight": torch.empty(1)}, families.SD1)
    vae = meta_tensors(fixture_part("sd15", VAE_PREFIX))
    with pytest.raises(UserError, match=r"encoder\.down\.0\.extra\.weight"):
        vae_convert.ldm_to_diffusers({**vae, "encoder.down.0.extra.weight": torch.empty(1, device="meta")})
    with pytest.raises(UserError):
        unet_convert.ldm_to_diffusers({"foo.weight": torch.empty(1)})


# ------------------------------------------------------------------------------ tiny, real weights


def sdxl_kwargs(config: dict, batch: int) -> dict:
    text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return {"added_cond_kwargs": {"text_embeds": torch.randn(batch, text_dim),
                                  "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)}}


@pytest.mark.parametrize("family", [f for _, f in CASES], ids=[c[0] for c in CASES])
def test_tiny_unet_round_trip_is_exact(family):
    torch.manual_seed(0)
    config = unet_convert.unet_config(family, "tiny")
    model = UNet2DConditionModel(**config).eval()
    sd = model.state_dict()

    ldm = unet_convert.diffusers_to_ldm(sd)
    back = unet_convert.ldm_to_diffusers(ldm)
    assert list(back) == list(sd)
    # Pure renaming: the very same tensor objects all the way round.
    assert all(back[k] is sd[k] for k in sd)
    assert sorted(map(id, ldm.values())) == sorted(map(id, sd.values()))

    inferred = unet_convert.infer_unet_config(back, family)
    assert inferred == config
    fresh = UNet2DConditionModel(**inferred).eval()
    fresh.load_state_dict(back, strict=True)

    sample = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, 7, config["cross_attention_dim"])
    extra = sdxl_kwargs(config, 2) if family.is_sdxl else {}
    with torch.no_grad():
        expected = model(sample, torch.tensor([10, 700]), context, **extra).sample
        got = fresh(sample, torch.tensor([10, 700]), context, **extra).sample
    assert expected.shape == (2, 4, 16, 16)
    assert torch.equal(expected, got)


@pytest.mark.parametrize("family", [f for _, f in CASES], ids=[c[0] for c in CASES])
def test_tiny_vae_round_trip_is_exact(family):
    torch.manual_seed(0)
    config = vae_convert.vae_config(family, "tiny")
    model = AutoencoderKL(**config).eval()
    sd = model.state_dict()

    ldm = vae_convert.diffusers_to_ldm(sd)
    width = config["block_out_channels"][-1]
    assert ldm["decoder.mid.attn_1.proj_out.weight"].shape == (width, width, 1, 1)
    back = vae_convert.ldm_to_diffusers(ldm)
    assert list(back) == list(sd)
    for key, tensor in sd.items():
        # Same storage: the attention reshape is a view, everything else the same object.
        assert back[key].untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
        assert torch.equal(back[key], tensor)

    inferred = vae_convert.infer_vae_config(back, family)
    assert inferred == config
    fresh = AutoencoderKL(**inferred).eval()
    fresh.load_state_dict(back, strict=True)

    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = model.encode(image).latent_dist.mean
        assert torch.equal(latents, fresh.encode(image).latent_dist.mean)
        assert torch.equal(model.decode(latents).sample, fresh.decode(latents).sample)
    assert latents.shape == (1, 4, 4, 4)


def test_vae_accepts_old_diffusers_attention_names():
    torch.manual_seed(0)
    sd = AutoencoderKL(**vae_convert.vae_config(families.SD1, "tiny")).state_dict()
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, tensor in sd.items():
        for new_name, old_name in renames.items():
            key = key.replace(f"attentions.0.{new_name}.", f"attentions.0.{old_name}.")
        old[key] = tensor
    assert "encoder.mid_block.attentions.0.query.weight" in old
    from_old = vae_convert.diffusers_to_ldm(old)
    from_new = vae_convert.diffusers_to_ldm(sd)
    assert list(from_old) == list(from_new)
    assert all(torch.equal(from_old[k], from_new[k]) for k in from_new)


@pytest.mark.parametrize("family", [f for _, f in CASES], ids=[c[0] for c in CASES])
def test_ldm_layout_agrees_with_diffusers_own_converter(family):
    """Independent oracle: diffusers' single-file converter must read our LDM output back exactly."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    torch.manual_seed(0)
    for config, model_class, ours, theirs, prefix in (
        (unet_convert.unet_config(family, "tiny"), UNet2DConditionModel, unet_convert, convert_ldm_unet_checkpoint,
         UNET_PREFIX),
        (vae_convert.vae_config(family, "tiny"), AutoencoderKL, vae_convert, convert_ldm_vae_checkpoint, VAE_PREFIX),
    ):
        with torch.device("meta"):
            shapes = shapes_of(model_class(**config).state_dict())
        # Distinct random values everywhere, so that any swapped pair of same-shaped tensors shows.
        sd = {k: torch.randn(s) for k, s in shapes.items()}
        checkpoint = {prefix + k: v for k, v in ours.diffusers_to_ldm(sd).items()}
        converted = theirs(checkpoint, config)
        assert set(converted) == set(sd)
        assert all(torch.equal(converted[k], sd[k]) for k in sd)
        mine = ours.ldm_to_diffusers({k[len(prefix):]: v for k, v in checkpoint.items()})
        assert all(torch.equal(mine[k], sd[k]) for k in sd)
