"""The rank-changing LoRA tools against independent math: svd_merge_lora.py and resize_lora.py give the
truncated-SVD optimum (computed here in float64), the dynamic rank rules keep the smallest rank that meets
them, extract_lora_from_models.py recovers a known low-rank change, extract_lora_from_dylora.py cuts the
leading ranks, check_lora_weights.py lists each tensor once."""

import json
import os

import pytest
import torch

from library.models import safetensors_io
from library.models.loading import load_models
from library.training.lora_metadata import safetensors_data_sha256
from lora_tool_helpers import fuse_with_diffusers, random_lora, run_tool, state
from networks import (check_lora_weights, extract_lora_from_dylora, extract_lora_from_models, merge_lora,
                      resize_lora, svd_merge_lora)


@pytest.fixture(scope="module")
def sd1(tiny_checkpoint, tmp_path_factory):
    path = tiny_checkpoint("sd1")
    models = load_models(path)
    root = tmp_path_factory.mktemp("rank")
    a = random_lora(models, root / "a.safetensors", 1, dim=4, alpha=2.0, conv_dim=4)
    b = random_lora(models, root / "b.safetensors", 2, dim=2, alpha=1.0)
    return path, a, b


def _change(tensors, name):
    down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
    return float(tensors[f"{name}.alpha"]) / down.shape[0] * (up.flatten(1) @ down.flatten(1))


def _best(matrix, k):
    """The best rank-k approximation (Eckart-Young), in float64."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def test_svd_merge_is_the_truncated_svd_of_the_weighted_sum(sd1, tmp_path):
    _, a, b = sd1
    out = tmp_path / "svd.safetensors"
    assert run_tool(svd_merge_lora.main, "--models", a, b, "--ratios", 0.7, -0.4, "--new_rank", 3,
                    "--new_conv_rank", 2, "--save_to", out) == 0
    ta, tb, to = (safetensors_io.load_tensors(str(p)) for p in (a, b, out))
    for name, k in (("lora_te_text_model_encoder_layers_1_mlp_fc1", 3),
                    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0", 3),
                    ("lora_unet_down_blocks_1_resnets_0_conv1", 2)):  # a 3x3 conv, only in a
        total = 0.7 * _change(ta, name) + (-0.4 * _change(tb, name) if f"{name}.alpha" in tb else 0)
        assert to[f"{name}.lora_down.weight"].shape[0] == k
        assert torch.allclose(_change(to, name), _best(total, k), atol=1e-5), name
    meta = safetensors_io.read_metadata(str(out))
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("3", "3")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2"}
    assert meta["sshs_model_hash"] == safetensors_data_sha256(str(out))


def test_svd_merged_lora_loads_in_diffusers_as_in_our_merge(sd1, tmp_path):
    base, a, b = sd1
    lora, merged = tmp_path / "svd.safetensors", tmp_path / "merged.safetensors"
    assert run_tool(svd_merge_lora.main, "--models", a, b, "--new_rank", 2, "--save_to", lora,
                    "--save_precision", "fp16") == 0
    assert run_tool(merge_lora.main, "--sd_model", base, "--models", lora, "--save_to", merged) == 0
    pipe = fuse_with_diffusers(load_models(base), [(str(lora), 1.0)])
    want, got = state(pipe.unet), state(load_models(str(merged)).unet)
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)

    from networks import lora as lora_module  # and the generators' network module takes it whole

    models = load_models(base)
    network, weights = lora_module.create_network_from_weights(1.0, str(lora), models.vae, models.text_encoders,
                                                               models.unet)
    assert network.unmatched_modules == [] and not network.load_state_dict(weights, strict=False).unexpected_keys


def _known_spectrum_lora(path, singular_values, out=24, inp=20):
    """One module whose change (scale 1/2) has exactly the given singular values."""
    generator = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(out, len(singular_values), generator=generator))[0]
    v = torch.linalg.qr(torch.randn(inp, len(singular_values), generator=generator))[0]
    s = torch.tensor(singular_values) * 2  # alpha/rank = 1/2 below
    name = "lora_unet_mid_block_attentions_0_proj_in"
    tensors = {f"{name}.lora_down.weight": (v * s).t().contiguous(), f"{name}.lora_up.weight": u.contiguous(),
               f"{name}.alpha": torch.tensor(len(singular_values) / 2)}
    safetensors_io.save_tensors(tensors, str(path), {"ss_network_module": "networks.lora", "ss_v2": "False"})
    return name


@pytest.mark.parametrize("rule,k", [((), 2), (("--dynamic_method", "sv_ratio", "--dynamic_param", 3), 2),
                                    (("--dynamic_method", "sv_fro", "--dynamic_param", 0.85), 1),
                                    (("--dynamic_method", "sv_fro", "--dynamic_param", 0.99), 3),
                                    (("--dynamic_method", "sv_cumulative", "--dynamic_param", 0.75), 2)],
                         ids=["fixed", "sv_ratio", "sv_fro", "sv_fro_99", "sv_cumulative"])
def test_resize_keeps_the_smallest_rank_meeting_the_rule_and_the_optimal_change(tmp_path, rule, k):
    # singular values 4, 2, 1, 0.5: S > 4/3 keeps 2; Frobenius shares 0.868, 0.970, 0.994; sum shares 0.53, 0.8, 0.93
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    name = _known_spectrum_lora(src, [4.0, 2.0, 1.0, 0.5])
    assert run_tool(resize_lora.main, "--model", src, "--save_to", out, "--new_rank", 2 if not rule else 8, *rule) == 0
    before, after = safetensors_io.load_tensors(str(src)), safetensors_io.load_tensors(str(out))
    assert after[f"{name}.lora_down.weight"].shape[0] == k
    assert torch.allclose(_change(after, name), _best(_change(before, name), k), atol=1e-5)
    meta = safetensors_io.read_metadata(str(out))
    assert meta["ss_network_dim"] == str(k)
    assert meta["sshs_model_hash"] == safetensors_data_sha256(str(out))
    assert meta["modelspec.title"] == "out"


def test_resize_never_raises_the_rank_and_updates_conv_args(sd1, tmp_path):
    _, a, _ = sd1
    out = tmp_path / "up.safetensors"
    assert run_tool(resize_lora.main, "--model", a, "--save_to", out, "--new_rank", 8, "--new_conv_rank", 2,
                    "--save_precision", "fp16") == 0
    before, after = safetensors_io.load_tensors(a), safetensors_io.load_tensors(str(out))
    linear, conv = "lora_te_text_model_encoder_layers_0_self_attn_v_proj", "lora_unet_down_blocks_1_resnets_0_conv2"
    assert after[f"{linear}.lora_down.weight"].shape[0] == 4  # the old rank: nothing to add
    assert after[f"{linear}.lora_down.weight"].dtype == torch.float16
    assert torch.allclose(_change(after, linear), _change(before, linear), atol=2e-3)
    assert after[f"{conv}.lora_down.weight"].shape == (2, *before[f"{conv}.lora_down.weight"].shape[1:])
    meta = safetensors_io.read_metadata(str(out))
    assert meta["ss_network_dim"] == "4" and json.loads(meta["ss_network_args"])["conv_dim"] == "2"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_extraction_recovers_a_known_low_rank_change(family, tiny_checkpoint, tmp_path):
    base = tiny_checkpoint(family)
    models = load_models(base)
    lora = random_lora(models, tmp_path / "known.safetensors", 7, dim=3, alpha=3.0, conv_dim=2)
    tuned, extracted, remerged = (tmp_path / n for n in ("tuned.safetensors", "x.safetensors", "re.safetensors"))
    merge = __import__("networks.sdxl_merge_lora").sdxl_merge_lora.main if family == "sdxl" else merge_lora.main
    assert run_tool(merge, "--sd_model", base, "--models", lora, "--save_to", tuned) == 0
    assert run_tool(extract_lora_from_models.main, "--model_org", base, "--model_tuned", tuned, "--save_to", extracted,
                    "--dim", 3, "--conv_dim", 2, "--clamp_quantile", 1, "--min_diff", 0) == 0
    assert set(safetensors_io.load_tensors(str(extracted))) == set(safetensors_io.load_tensors(lora))  # same modules
    assert run_tool(merge, "--sd_model", base, "--models", extracted, "--save_to", remerged) == 0
    want, got = safetensors_io.load_tensors(str(tuned)), safetensors_io.load_tensors(str(remerged))
    assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
    meta = safetensors_io.read_metadata(str(extracted))
    assert meta["ss_base_model_version"] == {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]


def test_extraction_drops_unchanged_text_encoders_and_clamps_at_the_quantile(sd1, tmp_path):
    base, _, _ = sd1
    models = load_models(base)
    unet_only = random_lora(models, tmp_path / "u.safetensors", 8, keep=lambda k: k.startswith("lora_unet_"))
    tuned = tmp_path / "tuned.safetensors"
    assert run_tool(merge_lora.main, "--sd_model", base, "--models", unet_only, "--save_to", tuned) == 0
    results = {}
    for q in (1, 0.9):
        out = tmp_path / f"x{q}.safetensors"
        assert run_tool(extract_lora_from_models.main, "--model_org", base, "--model_tuned", tuned, "--save_to", out,
                        "--dim", 4, "--clamp_quantile", q) == 0
        results[q] = safetensors_io.load_tensors(str(out))
    assert results[1] and not any(k.startswith("lora_te") for k in results[1])  # text encoder unchanged: left out
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"
    down, up = results[1][f"{name}.lora_down.weight"], results[1][f"{name}.lora_up.weight"]
    bound = torch.quantile(torch.cat([down.flatten(), up.flatten()]), 0.9)
    assert torch.allclose(results[0.9][f"{name}.lora_down.weight"], down.clamp(-bound, bound), atol=1e-6)
    assert torch.allclose(results[0.9][f"{name}.lora_up.weight"], up.clamp(-bound, bound), atol=1e-6)
    assert not torch.equal(results[0.9][f"{name}.lora_up.weight"], up)


def test_dylora_cut_is_the_leading_ranks_with_correct_hashes(sd1, tmp_path):
    base, _, _ = sd1
    models = load_models(base)
    dylora = random_lora(models, tmp_path / "dy.safetensors", 9, dim=6, alpha=3.0, module="networks.dylora", unit=2)
    assert run_tool(extract_lora_from_dylora.main, "--model", dylora, "--save_to", tmp_path / "cut.safetensors",
                    "--unit", 2) == 0
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("cut")) == ["cut-0002.safetensors",
                                                                             "cut-0004.safetensors"]
    source = safetensors_io.load_tensors(dylora)
    for rank in (2, 4):
        path = str(tmp_path / f"cut-{rank:04d}.safetensors")
        cut = safetensors_io.load_tensors(path)
        for key, value in source.items():
            want = value[:rank] if key.endswith("lora_down.weight") else (
                value[:, :rank] if key.endswith("lora_up.weight") else value)
            assert torch.equal(cut[key], want), key
        meta = safetensors_io.read_metadata(path)
        assert meta["ss_network_dim"] == str(rank)
        assert meta["sshs_model_hash"] == safetensors_data_sha256(path)


def test_check_lora_weights_lists_each_tensor_once(sd1, capsys):
    _, _, b = sd1
    tensors = safetensors_io.load_tensors(b)
    assert run_tool(check_lora_weights.main, b, "-s") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"number of LoRA modules: {len(tensors) * 2 // 3}"
    assert lines[1] == f"number of all modules: {len(tensors)}"
    rows = [line.split(",") for line in lines[2:]]
    assert sorted(r[0] for r in rows) == sorted(tensors)
    key, shape, mean, low = rows[0]
    value = tensors[key].float().abs()
    assert shape == str(tuple(tensors[key].shape)).replace(", ", "-")
    assert float(mean) == pytest.approx(float(value.mean())) and float(low) == pytest.approx(float(value.min()))
