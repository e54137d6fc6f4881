"""Tests for library.models.clip_convert: configs, key layouts against original checkpoints, OpenCLIP maths."""

import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.models import clip_convert as cc
from library.errors import UserError
from library.models.families import SD1, SD2, SDXL

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoint-keys"
CLIP_L = SD1.text_encoders[0]
OPENCLIP_H = SD2.text_encoders[0]
OPENCLIP_G = SDXL.text_encoders[1]
ALL_SPECS = [CLIP_L, OPENCLIP_H, OPENCLIP_G]


def fixture_section(name: str, prefix: str) -> dict:
    """The fixture keys under `prefix` (prefix removed) as meta tensors, in file order."""
    keys = json.loads((FIXTURES / name).read_text())["keys"]
    out = {}
    for key, shape in keys.items():
        if key.startswith(prefix):
            dtype = torch.int64 if key.endswith("position_ids") else torch.float32
            out[key[len(prefix):]] = torch.empty(shape, dtype=dtype, device="meta")
    return out


def shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


def full_meta_model(spec):
    return cc.build_text_encoder(cc.clip_config(spec, "full"), spec, device="meta")


def tiny_openclip_tower(spec, dtype=torch.float32, seed=0):
    """A seeded open_clip TextTransformer at tiny width with the spec's block count, plus its state dict."""
    from open_clip.transformer import TextTransformer

    torch.manual_seed(seed)
    dims = spec.tiny
    tower = TextTransformer(
        width=dims["hidden_size"], heads=1, layers=dims["num_hidden_layers"] + spec.dropped_openclip_layers,
        mlp_ratio=dims["intermediate_size"] / dims["hidden_size"], output_dim=dims["hidden_size"],
    ).eval()
    # Biases and LN affine are zeros/ones at init; randomise them so a wrong mapping cannot hide.
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_"):
                p.add_(torch.randn_like(p) * 0.1)
    sd = {k: v.to(dtype) for k, v in tower.state_dict().items()}
    sd["logit_scale"] = torch.tensor(3.25, dtype=dtype)
    return tower, sd


def prompt_ids(pad: int) -> torch.Tensor:
    ids = torch.full((2, 77), pad, dtype=torch.long)
    ids[:, 0] = cc.BOS_TOKEN_ID
    ids[0, 1:5] = torch.tensor([320, 1125, 539, cc.EOS_TOKEN_ID])
    ids[1, 1:3] = torch.tensor([2368, cc.EOS_TOKEN_ID])
    return ids


# ------------------------------------------------------------------------------------------ configs


def test_full_configs_match_released_models():
    l, h, g = (cc.clip_config(s, "full") for s in ALL_SPECS)
    assert (l.hidden_size, l.intermediate_size, l.num_hidden_layers, l.num_attention_heads, l.hidden_act) == (
        768, 3072, 12, 12, "quick_gelu")
    assert (h.hidden_size, h.intermediate_size, h.num_hidden_layers, h.num_attention_heads, h.hidden_act) == (
        1024, 4096, 23, 16, "gelu")
    assert (g.hidden_size, g.intermediate_size, g.num_hidden_layers, g.num_attention_heads, g.projection_dim) == (
        1280, 5120, 32, 20, 1280)
    for c in (l, h, g):
        assert (c.vocab_size, c.max_position_embeddings) == (49408, 77)
        assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (49406, 49407, 1)


def test_tiny_config_uses_one_head():
    c = cc.clip_config(OPENCLIP_G, "tiny")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads) == (32, 64, 32, 1)


@pytest.mark.parametrize("size", ["full", "tiny"])
@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.role)
def test_infer_config_reproduces_clip_config(spec, size):
    config = cc.clip_config(spec, size)
    model = cc.build_text_encoder(config, spec, device="meta")
    classic = cc.model_to_classic_keys(model.state_dict(), model)
    assert cc.infer_clip_config(classic, spec).to_dict() == config.to_dict()


# ----------------------------------------------------------------- key layouts of original checkpoints

CLIP_SECTIONS = [("sd15.json", "cond_stage_model.transformer."),
                 ("sdxl_base.json", "conditioner.embedders.0.transformer.")]
OPENCLIP_SECTIONS = [("sd21v.json", "cond_stage_model.model.", OPENCLIP_H, 294),
                     ("sdxl_base.json", "conditioner.embedders.1.model.", OPENCLIP_G, 390)]


@pytest.mark.parametrize("name,prefix", CLIP_SECTIONS)
def test_clip_l_section_matches_model_both_ways(name, prefix):
    section = fixture_section(name, prefix)
    assert len(section) == 197
    model = full_meta_model(CLIP_L)
    model_sd = model.state_dict()

    loaded = cc.classic_to_model_keys(cc.normalize_clip_keys(section), model)
    assert shapes(loaded) == shapes(model_sd)
    cc.load_into_model(model, cc.normalize_clip_keys(section))

    saved = cc.classic_to_clip_section(cc.model_to_classic_keys(model_sd, model))
    assert list(saved) == list(section)  # same keys in the same order
    assert shapes(saved) == shapes(section)
    pos = saved["text_model.embeddings.position_ids"]
    assert pos.dtype == torch.int64 and torch.equal(pos, torch.arange(77)[None])


@pytest.mark.parametrize("name,prefix,spec,count", OPENCLIP_SECTIONS, ids=["sd2", "sdxl"])
def test_openclip_section_matches_model_both_ways(name, prefix, spec, count):
    section = fixture_section(name, prefix)
    assert len(section) == count
    model = full_meta_model(spec)
    model_sd = model.state_dict()

    classic, extras = cc.openclip_to_classic(section, spec)
    assert shapes(cc.classic_to_model_keys(classic, model)) == shapes(model_sd)
    expected_extras = {"logit_scale"}
    if spec.dropped_openclip_layers:
        expected_extras |= {"text_projection"} | {k for k in section if k.startswith("transformer.resblocks.23.")}
    assert set(extras) == expected_extras
    cc.load_into_model(model, classic)

    saved = cc.classic_to_openclip(cc.model_to_classic_keys(model_sd, model), spec, extras=None)
    assert list(saved) == list(section)
    assert shapes(saved) == shapes(section)


def test_load_into_model_rejects_wrong_keys():
    model = full_meta_model(CLIP_L)
    classic = cc.model_to_classic_keys(model.state_dict(), model)
    del classic["text_model.final_layer_norm.bias"]
    classic["text_model.encoder.layers.12.mlp.fc1.weight"] = torch.empty(1, device="meta")
    with pytest.raises(UserError, match="final_layer_norm.bias"):
        cc.load_into_model(model, classic)


def test_legacy_sd1_keys_are_normalised():
    section = fixture_section("sd15.json", "cond_stage_model.transformer.")
    legacy = {k.removeprefix("text_model."): v for k, v in section.items()}
    assert "embeddings.position_ids" in legacy and "final_layer_norm.weight" in legacy
    normalised = cc.normalize_clip_keys(legacy)
    expected = {k: v for k, v in section.items() if k != "text_model.embeddings.position_ids"}
    assert list(normalised) == list(expected)
    assert all(normalised[k] is legacy[k.removeprefix("text_model.")] for k in normalised)


# --------------------------------------------------------------------------- OpenCLIP conversion


@pytest.mark.parametrize("spec", [OPENCLIP_H, OPENCLIP_G], ids=lambda s: s.role)
def test_hf_model_reproduces_openclip_maths(spec):
    tower, sd = tiny_openclip_tower(spec)
    classic, _ = cc.openclip_to_classic(sd, spec)
    model = cc.build_text_encoder(cc.infer_clip_config(classic, spec), spec, device="meta")
    cc.load_into_model(model, classic)
    ids = prompt_ids(pad=0)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        ref = tower.forward_intermediates(ids, output_fmt="NLC")["text_intermediates"]
        ref_pooled = tower(ids)
    layers = spec.tiny["num_hidden_layers"]
    assert len(out.hidden_states) == layers + 1
    for i in range(layers):
        torch.testing.assert_close(out.hidden_states[i + 1], ref[i], atol=1e-5, rtol=0)
    # SD2: the HF final state is OpenCLIP's penultimate block + ln_final; SDXL: the last block + ln_final.
    with torch.no_grad():
        torch.testing.assert_close(out.last_hidden_state, tower.ln_final(ref[layers - 1]), atol=1e-5, rtol=0)
    if spec.with_projection:
        # OpenCLIP: ln_final(x)[eos] @ text_projection; only right if the HF weight is the transpose.
        torch.testing.assert_close(out.text_embeds, ref_pooled, atol=1e-5, rtol=0)
        with torch.no_grad():
            eos_state = tower.ln_final(ref[-1])[torch.arange(2), ids.argmax(-1)]
            untransposed = eos_state @ tower.text_projection.T  # what sd-scripts' copy would compute
        assert (untransposed - ref_pooled).abs().max() > 0.1


def test_sdxl_projection_is_transposed_contiguous_and_saveable(tmp_path):
    _, sd = tiny_openclip_tower(OPENCLIP_G)
    classic, extras = cc.openclip_to_classic(sd, OPENCLIP_G)
    weight = classic["text_projection.weight"]
    assert torch.equal(weight, sd["text_projection"].T) and not torch.equal(weight, sd["text_projection"])
    assert weight.is_contiguous()
    # q/k/v are views into in_proj, not copies.
    packed = sd["transformer.resblocks.3.attn.in_proj_weight"]
    k = classic["text_model.encoder.layers.3.self_attn.k_proj.weight"]
    assert k.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
    assert torch.equal(k, packed[32:64])
    save_file(classic, tmp_path / "te2.safetensors")
    assert torch.equal(load_file(tmp_path / "te2.safetensors")["text_projection.weight"], weight)
    assert set(extras) == {"logit_scale"}


def test_playground_nested_projection_is_taken_as_hf_layout():
    _, sd = tiny_openclip_tower(OPENCLIP_G)
    sd["text_projection.weight"] = sd.pop("text_projection")
    classic, _ = cc.openclip_to_classic(sd, OPENCLIP_G)
    assert classic["text_projection.weight"] is sd["text_projection.weight"]


@pytest.mark.parametrize("spec", [OPENCLIP_H, OPENCLIP_G], ids=lambda s: s.role)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_openclip_round_trip_is_bit_exact(spec, dtype):
    _, sd = tiny_openclip_tower(spec, dtype=dtype)
    classic, extras = cc.openclip_to_classic(sd, spec)
    back = cc.classic_to_openclip(classic, spec, extras)
    assert set(back) == set(sd)
    assert [k for k in sd if back[k].dtype != sd[k].dtype or not torch.equal(back[k], sd[k])] == []


def test_sd2_extras_are_synthesised_when_missing():
    _, sd = tiny_openclip_tower(OPENCLIP_H, dtype=torch.float16)
    classic, _ = cc.openclip_to_classic(sd, OPENCLIP_H)
    out = cc.classic_to_openclip(classic, OPENCLIP_H, extras=None)
    assert set(out) == set(sd)
    for suffix in ("attn.in_proj_weight", "mlp.c_proj.bias", "ln_2.weight"):
        copy, last = out[f"transformer.resblocks.23.{suffix}"], out[f"transformer.resblocks.22.{suffix}"]
        assert torch.equal(copy, last) and copy.untyped_storage().data_ptr() != last.untyped_storage().data_ptr()
    assert torch.equal(out["text_projection"], torch.eye(32, dtype=torch.float16))
    scale = out["logit_scale"]
    assert scale.shape == () and scale.dtype == torch.float16
    assert scale.item() == pytest.approx(math.log(100.0), abs=2e-3)


def test_sdxl_logit_scale_defaults_without_extras():
    _, sd = tiny_openclip_tower(OPENCLIP_G)
    classic, _ = cc.openclip_to_classic(sd, OPENCLIP_G)
    out = cc.classic_to_openclip(classic, OPENCLIP_G, extras={})
    assert out["logit_scale"].item() == pytest.approx(math.log(100.0))
    assert torch.equal(out["text_projection"], sd["text_projection"])


def test_unknown_openclip_key_is_a_user_error():
    _, sd = tiny_openclip_tower(OPENCLIP_G)
    sd["transformer.resblocks.0.ls_1.gamma"] = torch.ones(32)
    sd["visual.proj"] = torch.ones(2)
    with pytest.raises(UserError, match="visual.proj"):
        cc.openclip_to_classic(sd, OPENCLIP_G)


# ------------------------------------------------------------------------------- meta-built models


def test_meta_built_clip_l_is_usable_after_loading():
    config = cc.clip_config(CLIP_L, "tiny")
    torch.manual_seed(1)
    reference = cc.build_text_encoder(config, CLIP_L, device="cpu")
    classic = cc.model_to_classic_keys(reference.state_dict(), reference)
    assert all(k.startswith("text_model.") for k in classic)

    model = cc.build_text_encoder(config, CLIP_L, device="meta")
    cc.load_into_model(model, classic)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    # assign=True: the model holds the given tensors, no copies.
    fc1 = "text_model.encoder.layers.0.mlp.fc1.weight"
    (model_key,) = cc.classic_to_model_keys({fc1: None}, model)
    assert dict(model.named_parameters())[model_key].data_ptr() == classic[fc1].data_ptr()
    position_ids = next(b for n, b in model.named_buffers() if n.endswith("position_ids"))
    assert position_ids.dtype == torch.int64 and torch.equal(position_ids, torch.arange(77)[None])

    ids = prompt_ids(pad=cc.EOS_TOKEN_ID)  # SD1 pads with EOS
    with torch.no_grad():
        out, ref = model(ids), reference(ids)
    assert torch.isfinite(out.last_hidden_state).all()
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=0, rtol=0)


def test_pooling_uses_first_eos_even_with_added_tokens():
    # Textual-inversion tokens get ids above EOS; argmax(ids) pooling would pick them.
    spec = OPENCLIP_G
    _, sd = tiny_openclip_tower(spec)
    sd["token_embedding.weight"] = torch.cat([sd["token_embedding.weight"], torch.randn(2, 32)])
    classic, _ = cc.openclip_to_classic(sd, spec)
    config = cc.infer_clip_config(classic, spec)
    assert config.vocab_size == 49410
    model = cc.build_text_encoder(config, spec)
    cc.load_into_model(model, classic)
    ids = prompt_ids(pad=0)
    ids[0, 2] = 49409
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    final = model.text_model.final_layer_norm(out.hidden_states[-1])
    expected = final[torch.arange(2), torch.tensor([4, 2])] @ classic["text_projection.weight"].T
    torch.testing.assert_close(out.text_embeds, expected, atol=1e-5, rtol=0)


def test_load_into_model_casts_floats_only_when_asked():
    config = cc.clip_config(CLIP_L, "tiny")
    source = cc.build_text_encoder(config, CLIP_L, device="cpu")
    classic = cc.model_to_classic_keys(source.state_dict(), source)
    model = cc.build_text_encoder(config, CLIP_L, device="meta")
    cc.load_into_model(model, classic, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert next(b for n, b in model.named_buffers() if n.endswith("position_ids")).dtype == torch.int64
