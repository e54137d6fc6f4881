"""networks/merge_lora.py and sdxl_merge_lora.py: LoRAs into a checkpoint (against the formula written out
here and against diffusers' load_lora_weights + fuse_lora), LoRA + LoRA (sum with the ratio applied once,
exact --concat, --shuffle), block weights, and the one-line refusals that write nothing."""

import os

import pytest
import torch
import torch.nn.functional as F

from library.models import safetensors_io
from library.models.loading import load_models
from library.training.lora_metadata import safetensors_data_sha256
from lora_tool_helpers import fuse_with_diffusers, random_lora, run_tool, state
from networks import merge_lora, sdxl_merge_lora


@pytest.fixture(scope="module")
def sd1(tiny_checkpoint, tmp_path_factory):
    path = tiny_checkpoint("sd1")
    models = load_models(path)
    root = tmp_path_factory.mktemp("sd1loras")
    a = random_lora(models, root / "a.safetensors", 1, dim=4, alpha=2.0, conv_dim=4)  # C3Lier
    b = random_lora(models, root / "b.safetensors", 2, dim=2, alpha=1.0)  # LierLa, another rank
    return path, a, b


def _lora(path):
    tensors = safetensors_io.load_tensors(path)
    return {k.rpartition(".lora_down.weight")[0]: k for k in tensors if k.endswith(".lora_down.weight")}, tensors


def _expected_change(tensors, name, ratio):
    """ratio · alpha/r · up∘down of one module, composed as the layers compose (the formula of lora-format §3)."""
    down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
    scale = float(tensors[f"{name}.alpha"]) / down.shape[0]
    if down.dim() == 2:
        change = up @ down
    else:  # a k×k conv followed by a 1×1 conv is the conv of the first's kernels with the second's weights
        change = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    return ratio * scale * change


# LoRA module -> its key in the SD1 single file (LDM names), written out by hand from model-formats.md §3
SD1_KEYS = {
    "lora_te_text_model_encoder_layers_3_self_attn_q_proj": "cond_stage_model.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight",
    "lora_unet_down_blocks_0_attentions_0_proj_in": "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k": "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
    "lora_unet_down_blocks_1_resnets_0_conv1": "model.diffusion_model.input_blocks.4.0.in_layers.2.weight",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "model.diffusion_model.output_blocks.2.1.conv.weight",
}


def test_merge_into_sd1_checkpoint_is_base_plus_ratio_scale_change_and_matches_diffusers(sd1, tmp_path):
    base, a, b = sd1
    out = tmp_path / "merged.safetensors"
    assert run_tool(merge_lora.main, "--sd_model", base, "--models", a, b, "--ratios", 0.7, -0.4, "--save_to", out) == 0
    src, dst = safetensors_io.load_tensors(base), safetensors_io.load_tensors(str(out))
    assert list(src) == list(dst)  # every key, in the file's order
    names_a, ta = _lora(a)
    names_b, tb = _lora(b)
    for name, key in SD1_KEYS.items():
        expected = src[key].double() + _expected_change(ta, name, 0.7)
        if name in names_b:
            expected += _expected_change(tb, name, -0.4)
        assert torch.allclose(dst[key].double(), expected, atol=1e-6), name
    changed = {k for k in src if not torch.equal(src[k], dst[k])}
    assert len(changed) == len(set(names_a) | set(names_b))  # one layer per module, nothing else touched
    assert dst[next(iter(SD1_KEYS.values()))].dtype == src[next(iter(SD1_KEYS.values()))].dtype  # keeps the dtype
    meta = safetensors_io.read_metadata(str(out))
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.merged_from"] == f"{os.path.splitext(os.path.basename(base))[0]}, a, b"

    pipe = fuse_with_diffusers(load_models(base), [(a, 0.7), (b, -0.4)])
    ours = load_models(str(out))
    for theirs, mine in ((pipe.unet, ours.unet), (pipe.text_encoder, ours.text_encoders[0])):
        want, got = state(theirs), state(mine)
        assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)


def test_sdxl_lora_into_sdxl_checkpoint_with_both_text_encoders_matches_diffusers(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("sdxl")
    models = load_models(base)
    lora = random_lora(models, tmp_path / "xl.safetensors", 3, dim=4, alpha=4.0, conv_dim=2)
    assert any(k.startswith("lora_unet_input_blocks_") for k in safetensors_io.load_tensors(lora))  # SGM names
    out = tmp_path / "xl-merged.safetensors"
    assert run_tool(sdxl_merge_lora.main, "--sd_model", base, "--models", lora, "--ratios", 0.8, "--save_to", out,
                    "--save_precision", "fp16") == 0
    merged = load_models(str(out))
    assert next(merged.unet.parameters()).dtype == torch.float16
    pipe = fuse_with_diffusers(load_models(base), [(lora, 0.8)])
    for theirs, mine in ((pipe.unet, merged.unet), (pipe.text_encoder, merged.text_encoders[0]),
                         (pipe.text_encoder_2, merged.text_encoders[1])):
        want, got = state(theirs), state(mine)  # ours saved in fp16: diffusers' result rounded the same way
        assert all(torch.equal(got[k], want[k].half()) for k in want), type(theirs)
    assert safetensors_io.read_metadata(str(out))["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_diffusers_folder_in_and_out_equal_the_streamed_single_file(sd1, tmp_path):
    from library.models.saving import save_models

    base, a, _ = sd1
    folder = str(tmp_path / "base_diffusers")
    save_models(load_models(base), folder)
    streamed, from_folder, to_folder = tmp_path / "s.safetensors", tmp_path / "f.safetensors", tmp_path / "out_diffusers"
    for src, dst in ((base, streamed), (folder, from_folder), (base, to_folder)):
        assert run_tool(merge_lora.main, "--sd_model", src, "--models", a, "--ratios", 0.5, "--save_to", dst) == 0
    reference = load_models(str(streamed))
    for other in (load_models(str(from_folder)), load_models(str(to_folder))):
        want, got = state(reference.unet), state(other.unet)
        assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
        want, got = state(reference.text_encoders[0]), state(other.text_encoders[0])
        assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)


def _change(tensors, name):
    down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
    return float(tensors[f"{name}.alpha"]) / down.shape[0] * (up.flatten(1) @ down.flatten(1))


def test_lora_plus_lora_sum_applies_each_ratio_once_and_concat_is_the_exact_sum(sd1, tmp_path):
    _, a, b = sd1
    names_a, ta = _lora(a)
    _, tb = _lora(b)
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"

    single = tmp_path / "single.safetensors"
    assert run_tool(merge_lora.main, "--models", a, "--ratios", -0.5, "--save_to", single) == 0
    ts = safetensors_io.load_tensors(str(single))
    assert torch.allclose(_change(ts, name), -0.5 * _change(ta, name), atol=1e-6)  # sd-scripts: +0.25 (r·|r|)

    concat = tmp_path / "concat.safetensors"
    assert run_tool(merge_lora.main, "--models", a, b, "--ratios", 0.7, 0.3, "--concat", "--save_to", concat) == 0
    tc = safetensors_io.load_tensors(str(concat))
    assert tc[f"{name}.lora_down.weight"].shape[0] == 6
    assert torch.allclose(_change(tc, name), 0.7 * _change(ta, name) + 0.3 * _change(tb, name), atol=1e-6)
    conv = "lora_unet_down_blocks_1_resnets_0_conv1"  # only in a: concat keeps its rank and change
    assert torch.allclose(_change(tc, conv), 0.7 * _change(ta, conv), atol=1e-6)
    meta = safetensors_io.read_metadata(str(concat))
    assert meta["sshs_model_hash"] == safetensors_data_sha256(str(concat))  # the hash of the bytes written
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"

    shuffled = tmp_path / "shuffled.safetensors"
    assert run_tool(merge_lora.main, "--models", a, "--shuffle", "--save_to", shuffled) == 0
    th = safetensors_io.load_tensors(str(shuffled))
    assert any(not torch.equal(th[f"{n}.lora_down.weight"], ta[f"{n}.lora_down.weight"]) for n in names_a)
    assert all(torch.allclose(_change(th, n), _change(ta, n), atol=1e-6) for n in names_a)

    # summing factors of equal ranks: each input's own term once, plus the cross terms of the factor sums
    summed = tmp_path / "sum.safetensors"
    assert run_tool(merge_lora.main, "--models", a, a, "--ratios", 0.6, 0.2, "--save_to", summed) == 0
    assert torch.allclose(_change(safetensors_io.load_tensors(str(summed)), name),
                          (0.6 ** 0.5 + 0.2 ** 0.5) ** 2 * _change(ta, name), atol=1e-6)


def test_block_weights_scale_each_block_once(tiny_checkpoint, tmp_path):
    models = load_models(tiny_checkpoint("sdxl"))
    lora = random_lora(models, tmp_path / "xl.safetensors", 4, dim=2, alpha=2.0)
    out = tmp_path / "lbw.safetensors"
    weights = [1.0] * 20
    weights[0], weights[1 + 4], weights[10] = 0.0, -0.5, 2.0  # BASE (text encoders), IN04, MID
    assert run_tool(sdxl_merge_lora.main, "--models", lora, "--lbws", str(weights), "--save_to", out) == 0
    src, dst = safetensors_io.load_tensors(lora), safetensors_io.load_tensors(str(out))
    names = {k.partition(".")[0] for k in src}
    expected = {"lora_te1_": 0.0, "lora_te2_": 0.0, "lora_unet_input_blocks_4_": -0.5, "lora_unet_middle_block_": 2.0,
                "lora_unet_output_blocks_0_": 1.0}
    for prefix, weight in expected.items():
        name = next(n for n in names if n.startswith(prefix))
        assert torch.allclose(_change(dst, name), weight * _change(src, name), atol=1e-6), prefix


def test_refusals_are_one_line_and_write_nothing(sd1, tiny_checkpoint, tmp_path, capsys):
    base, a, b = sd1
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(open(a, "rb").read()[:5000])
    xl = tiny_checkpoint("sdxl")
    cases = [
        ((merge_lora.main, "--sd_model", base, "--models", truncated, "--save_to", out), "truncated"),
        ((sdxl_merge_lora.main, "--sd_model", xl, "--models", a, "--save_to", out), "Stable Diffusion XL"),
        ((merge_lora.main, "--sd_model", xl, "--models", a, "--save_to", out), "match no layer"),
        ((merge_lora.main, "--sd_model", base, "--models", tmp_path / "missing.safetensors", "--save_to", out),
         "no such file"),
        ((merge_lora.main, "--models", a, b, "--save_to", out), "ranks"),  # summing needs equal ranks
        ((merge_lora.main, "--models", a, b, "--ratios", 1, "--save_to", out), "--ratios"),
        ((merge_lora.main, "--sd_model", base, "--models", a, "--concat", "--save_to", out), "--concat"),
        ((merge_lora.main, "--models", a, "--save_to", a), "overwrite"),
    ]
    for (main, *argv), words in cases:
        assert run_tool(main, *argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and words in err, err
    assert out.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["cut.safetensors", "out.safetensors"]  # no temp files left
