"""The LoRA tools on files sd-scripts writes: every module of sd-scripts' SD1.5 and SDXL LoRA, C3Lier and
DyLoRA files finds its layer in the original full-size checkpoint layouts (key/shape fixtures, nothing
allocated), and the real sd-scripts SD1.5 LoRA resizes to the truncated-SVD optimum with its training
metadata kept."""

import json
import os

import pytest
import torch

from library.models import network_deltas, network_merge, network_targets, safetensors_io
from library.training.lora_metadata import safetensors_data_sha256
from lora_tool_helpers import run_tool
from networks import check_lora_weights, resize_lora

CASES = [
    ("sd-scripts/lora_sd15_lierla_dim4.keys.json", "checkpoint-keys/sd15.json"),
    ("sd-scripts/lora_sd15_c3lier_dim4_conv4.keys.json", "checkpoint-keys/sd15.json"),
    ("sd-scripts/dylora_sd15_dim4_unit2.keys.json", "sd-scripts/checkpoint_sd15_fp16.keys.json"),
    ("sd-scripts/lora_sdxl_unet_te1_te2_dim4_conv4.keys.json", "checkpoint-keys/sdxl_base.json"),
    ("sd-scripts/lora_sdxl_unet_only_dim4.keys.json", "sd-scripts/checkpoint_sdxl_base_fp16.keys.json"),
]


def _shapes(fixtures_dir, name):
    data = json.load(open(os.path.join(fixtures_dir, name), encoding="utf-8"))
    if "keys" in data:
        return {k: tuple(v) for k, v in data["keys"].items()}
    return {k: tuple(v[0]) for k, v in data["tensors"].items()}


@pytest.mark.parametrize("lora,checkpoint", CASES, ids=[os.path.basename(c[0]).split(".")[0] for c in CASES])
def test_every_module_of_sd_scripts_files_finds_its_full_size_layer(fixtures_dir, lora, checkpoint):
    lora_shapes, ckpt_shapes = _shapes(fixtures_dir, lora), _shapes(fixtures_dir, checkpoint)
    modules = network_deltas.group_modules({k: torch.empty(s, device="meta") for k, s in lora_shapes.items()})
    family, targets = network_targets.checkpoint_targets(checkpoint, ckpt_shapes)
    resolved = network_merge.resolve(modules, targets, lora, family.title)
    for name, target in resolved:
        network_deltas.check_fits(modules[name], target.shape, name)
        assert target.key in ckpt_shapes
    places = [(t.key, t.part) for _, t in resolved]
    assert len(set(places)) == len(places) == len(modules)  # one layer each, q/k/v as thirds of OpenCLIP's in_proj
    if "te1_te2" in lora:
        assert sum(t.part is not None for _, t in resolved) == 3 * 32  # q, k, v of all 32 TE2 layers
        assert all(t.key.startswith(("model.diffusion_model.", "conditioner.")) for _, t in resolved)


def test_the_real_sd_scripts_lora_resizes_to_the_best_approximation(fixtures_dir, tmp_path, capsys):
    src = os.path.join(fixtures_dir, "sd-scripts", "lora_sd15_lierla_dim4.safetensors")
    out = tmp_path / "r2.safetensors"
    assert run_tool(resize_lora.main, "--model", src, "--save_to", out, "--new_rank", 2, "--save_precision", "fp16") == 0
    before, after = safetensors_io.load_tensors(src), safetensors_io.load_tensors(str(out))
    assert set(after) == set(before)
    for name in ("lora_te_text_model_encoder_layers_11_mlp_fc2", "lora_unet_up_blocks_3_attentions_2_proj_out"):
        down, up = before[f"{name}.lora_down.weight"].double(), before[f"{name}.lora_up.weight"].double()
        change = float(before[f"{name}.alpha"]) / down.shape[0] * (up.flatten(1) @ down.flatten(1))
        u, s, vh = torch.linalg.svd(change, full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        down2, up2 = after[f"{name}.lora_down.weight"].double(), after[f"{name}.lora_up.weight"].double()
        assert down2.shape[0] == 2 and down2.shape[1:] == down.shape[1:]  # 1x1 convs stay 4-D
        got = float(after[f"{name}.alpha"]) / 2 * (up2.flatten(1) @ down2.flatten(1))
        assert torch.allclose(got, best, atol=2e-3 * float(best.abs().max()))
    meta, old = safetensors_io.read_metadata(str(out)), safetensors_io.read_metadata(src)
    assert meta["ss_network_dim"] == "2" and meta["ss_training_comment"].startswith("dimension is resized from 4 to 2")
    assert meta["ss_seed"] == old["ss_seed"] and meta["ss_network_module"] == "networks.lora"
    assert meta["modelspec.architecture"] == old["modelspec.architecture"] and meta["modelspec.title"] == "r2"
    assert meta["sshs_model_hash"] == safetensors_data_sha256(str(out)) != old["sshs_model_hash"]

    capsys.readouterr()
    assert run_tool(check_lora_weights.main, src) == 0
    assert capsys.readouterr().out.splitlines()[0] == "number of LoRA modules: 528"
