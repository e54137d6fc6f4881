"""LoRA networks (networks.lora / dylora / lora_fa): module names and shapes against files sd-scripts
wrote, forward/merge math on tiny models, block-wise args, optimizer groups, regularisation, dropout."""

import copy
import json
import math
import os

import pytest
import torch

from library.errors import UserError
from library.models.families import FAMILIES
from networks import dylora, lora, lora_fa, lora_names

SD_SCRIPTS = "sd-scripts"


# --- models ---------------------------------------------------------------------------------


def _meta_models(family_name):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from library.models import clip_convert, unet_convert

    family = FAMILIES[family_name]
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_convert.unet_config(family, "full"))
    tes = [clip_convert.build_text_encoder(clip_convert.clip_config(s, "full"), s, device="meta")
           for s in family.text_encoders]
    return unet, tes


@pytest.fixture(scope="module")
def meta_models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _meta_models(name)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def tiny():
    from library.models.random_models import build_random_models

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_random_models(FAMILIES[name], "tiny", 0)
        return cache[name]

    return get


def _fixture(fixtures_dir, name):
    with open(os.path.join(fixtures_dir, SD_SCRIPTS, f"{name}.keys.json")) as f:
        return {k: v[0] for k, v in json.load(f)["tensors"].items()}


def _shapes(network):
    return {k: list(v.shape) for k, v in network.state_dict().items()}


def _randomise_up(network, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora_module in network.all_loras():
            for name, p in lora_module.named_parameters():
                if "lora_up" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * std)


def _unet_inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, text, generator=g),
                                       "time_ids": torch.randn(1, 6, generator=g)}
    return (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]),
            torch.randn(1, 5, cfg.cross_attention_dim, generator=g)), kwargs


def _unet_out(unet):
    args, kwargs = _unet_inputs(unet)
    with torch.no_grad():
        return unet(*args, **kwargs).sample


def _te_out(te):
    with torch.no_grad():
        return te(torch.arange(1, 9)[None]).last_hidden_state


# --- names and shapes against sd-scripts' files ---------------------------------------------

FIXTURE_CASES = [
    # fixture, family, module, kwargs, apply_text_encoder
    ("lora_sd15_lierla_dim4", "sd1", lora, {}, True),
    ("lora_sd15_c3lier_dim4_conv4", "sd1", lora, {"conv_dim": "4", "conv_alpha": "1"}, True),
    ("lora_sdxl_unet_te1_te2_dim4_conv4", "sdxl", lora, {"conv_dim": "4", "conv_alpha": "1"}, True),
    ("lora_sdxl_unet_only_dim4", "sdxl", lora, {}, False),
    ("dylora_sd15_dim4_unit2", "sd1", dylora, {"unit": "2"}, True),
]


@pytest.mark.parametrize("fixture,family,module,kwargs,apply_te", FIXTURE_CASES, ids=[c[0] for c in FIXTURE_CASES])
def test_state_dict_matches_sd_scripts_file(fixture, family, module, kwargs, apply_te, meta_models, fixtures_dir):
    unet, tes = meta_models(family)
    te = tes if family == "sdxl" else tes[0]
    network = module.create_network(1.0, 4, None, None, te, unet, **kwargs)
    network.apply_to(te, unet, apply_text_encoder=apply_te, apply_unet=True)
    try:
        assert _shapes(network) == _fixture(fixtures_dir, fixture)
    finally:
        network.unapply()


def test_sd2_module_counts_and_linear_projections(meta_models):
    unet, tes = meta_models("sd2")
    network = lora.create_network(1.0, 4, 1, None, tes[0], unet)
    assert (len(network.text_encoder_loras), len(network.unet_loras)) == (138, 192)
    sd = network.state_dict()
    assert list(sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape) == [4, 320]
    assert "lora_te_text_model_encoder_layers_22_mlp_fc2.lora_up.weight" in sd


def test_base_model_keys_unchanged_and_unet_only(tiny):
    models = tiny("sdxl")
    te_keys = [list(t.state_dict()) for t in models.text_encoders]
    unet_keys = list(models.unet.state_dict())
    network = lora.create_network(1.0, 4, 1, None, models.text_encoders, models.unet)
    assert {n.split("_")[1] for n in network._modules} == {"te1", "te2", "unet"}
    network.apply_to(models.text_encoders, models.unet, apply_text_encoder=False, apply_unet=True)
    try:
        assert not network.text_encoder_loras
        assert all(k.startswith("lora_unet_") for k in network.state_dict())
        assert list(models.unet.state_dict()) == unet_keys
        assert [list(t.state_dict()) for t in models.text_encoders] == te_keys
    finally:
        network.unapply()


def test_from_real_file_reads_ranks_and_alphas(meta_models, fixtures_dir):
    unet, tes = meta_models("sd1")
    path = os.path.join(fixtures_dir, SD_SCRIPTS, "lora_sd15_lierla_dim4.safetensors")
    network, weights = lora.create_network_from_weights(0.5, path, None, tes[0], unet)
    assert network.unmatched_modules == []
    assert _shapes(network) == {k: list(v.shape) for k, v in weights.items()}
    assert weights["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"].dtype == torch.int64
    assert {m.lora_dim for m in network.all_loras()} == {4}
    assert {m.scale for m in network.all_loras()} == {0.25}
    assert {m.multiplier for m in network.all_loras()} == {0.5}


def test_sdxl_file_with_diffusers_unet_names_is_converted(meta_models):
    from library.models import unet_convert

    unet, tes = meta_models("sdxl")
    network = lora.create_network(1.0, 4, 1, None, tes, unet, conv_dim="2")
    pairs = unet_convert.module_prefix_pairs(dict(unet.config))
    renamed = {}
    for key, value in network.state_dict().items():
        module, _, rest = key.partition(".")
        if module.startswith("lora_unet_"):
            module = "lora_unet_" + unet_convert.ldm_module_to_diffusers(module[len("lora_unet_"):], pairs, sep="_")
        renamed[f"{module}.{rest}"] = value
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in renamed
    assert "lora_unet_up_blocks_0_upsamplers_0_conv.alpha" in renamed
    again, converted = lora.create_network_from_weights(1.0, None, None, tes, unet, weights_sd=renamed)
    assert again.unmatched_modules == []
    assert set(converted) == set(network.state_dict())
    assert _shapes(again) == _shapes(network)


# --- forward and merge ----------------------------------------------------------------------


def test_multiplier_zero_and_disabled_equal_base(tiny):
    models = tiny("sd1")
    unet, te = models.unet, models.text_encoders[0]
    base_unet, base_te = _unet_out(unet), _te_out(te)
    network = lora.create_network(0.0, 4, 4, None, te, unet, conv_dim="4")
    _randomise_up(network)
    network.apply_to(te, unet)
    try:
        assert torch.equal(_unet_out(unet), base_unet)
        assert torch.equal(_te_out(te), base_te)
        network.set_multiplier(1.0)
        assert not torch.allclose(_unet_out(unet), base_unet, atol=1e-4)
        network.set_enabled(False)
        assert torch.equal(_unet_out(unet), base_unet)
    finally:
        network.unapply()
    assert torch.equal(_unet_out(unet), base_unet)


def test_dynamic_output_equals_merged_output(tiny):
    models = tiny("sd1")
    unet, te = models.unet, models.text_encoders[0]
    network = lora.create_network(0.7, 4, 2.0, None, te, unet, conv_dim="3", conv_alpha="1.5")
    _randomise_up(network)
    kinds = {(m.is_conv, getattr(m, "kernel_size", None)) for m in network.unet_loras}
    assert {(False, None), (True, (3, 3)), (True, (1, 1))} <= kinds  # linear, 3x3 and 1x1 all covered
    weights = {k: v.clone() for k, v in network.state_dict().items()}

    merged_unet, merged_te = copy.deepcopy(unet), copy.deepcopy(te)
    network.apply_to(te, unet)
    try:
        dynamic = _unet_out(unet), _te_out(te)
    finally:
        network.unapply()
    other, _ = lora.create_network_from_weights(0.7, None, None, merged_te, merged_unet, weights_sd=weights)
    other.merge_to(merged_te, merged_unet, weights, None, None)
    assert torch.allclose(_unet_out(merged_unet), dynamic[0], atol=1e-4, rtol=1e-4)
    assert torch.allclose(_te_out(merged_te), dynamic[1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_unet_out(unet), dynamic[0], atol=1e-3)


def test_merge_adds_scaled_delta_sdxl_sgm_names(tiny):
    models = tiny("sdxl")
    unet, tes = copy.deepcopy(models.unet), [copy.deepcopy(t) for t in models.text_encoders]
    network = lora.create_network(1.0, 2, 1.0, None, tes, unet, conv_dim="2", conv_alpha="4")
    _randomise_up(network)
    weights = network.state_dict()
    before = {m.lora_name: m.org_module.weight.detach().clone() for m in network.all_loras()}
    network.set_multiplier(-0.5)
    network.merge_to(tes, unet, weights)
    checked = 0
    for m in network.all_loras():
        down, up = m.factors()
        delta = lora.lora_delta(down.detach(), up.detach()) * (-0.5 * m.scale)
        assert torch.allclose(m.org_module.weight, before[m.lora_name] + delta.reshape(before[m.lora_name].shape),
                              atol=1e-6)
        checked += 1
    assert checked == len(weights) // 3
    names = set(network._modules)
    assert "lora_unet_input_blocks_3_0_op" in names and "lora_unet_output_blocks_2_2_conv" in names
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q" in names


def test_pre_calculation_and_restore(tiny):
    models = tiny("sd1")
    unet = copy.deepcopy(models.unet)
    te = copy.deepcopy(models.text_encoders[0])
    network = lora.create_network(1.0, 4, 1, None, te, unet)
    _randomise_up(network)
    base = _unet_out(unet)
    network.apply_to(te, unet)
    try:
        dynamic = _unet_out(unet)
        network.backup_weights()
        network.pre_calculation()
        assert torch.allclose(_unet_out(unet), dynamic, atol=1e-4)
        network.restore_weights()
        network.set_enabled(False)
        assert torch.allclose(_unet_out(unet), base, atol=1e-6)
    finally:
        network.unapply()


# --- dropout --------------------------------------------------------------------------------


def test_dropouts_only_in_training(tiny):
    models = tiny("sd1")
    te = models.text_encoders[0]
    plain = lora.create_network(1.0, 4, 1, None, te, None)
    dropped = lora.create_network(1.0, 4, 1, None, te, None, neuron_dropout=0.3, rank_dropout="0.5",
                                  module_dropout="0.2")
    _randomise_up(dropped)
    plain.load_state_dict(dropped.state_dict())
    module = dropped.text_encoder_loras[0]
    x = torch.randn(2, 3, module.in_dim)
    module.eval()
    reference = plain.text_encoder_loras[0].lora_forward(x)
    assert torch.equal(module.lora_forward(x), reference)
    module.train()
    torch.manual_seed(0)
    outs = [module.lora_forward(x) for _ in range(4)]
    assert all(not torch.allclose(o, reference) for o in outs)
    # rank dropout zeroes whole ranks per sample and rescales the rest by 1/(1-p).
    module.dropout = None
    torch.manual_seed(1)
    out = module.lora_forward(x)
    down, up = module.factors()
    torch.manual_seed(1)
    keep = (torch.rand(2, 4) > 0.5).float()
    h = (x @ down.T) * keep[:, None, :]
    assert torch.allclose(out, h @ up.T * module.scale / 0.5, atol=1e-6)


def test_module_dropout_skips_the_adapter(tiny):
    models = tiny("sd1")
    te = models.text_encoders[0]
    network = lora.create_network(1.0, 4, 1, None, te, None, module_dropout="0.99")
    _randomise_up(network)
    module = network.text_encoder_loras[0]
    x = torch.randn(1, 3, module.in_dim)
    module.org_forward = lambda t: torch.zeros(1, 3, module.out_dim)
    module.train()
    torch.manual_seed(0)
    assert sum(bool(module(x).abs().sum() == 0) for _ in range(20)) >= 15
    module.eval()
    assert module(x).abs().sum() > 0


# --- block-wise args ------------------------------------------------------------------------


def test_block_dims_and_alphas_sd(meta_models):
    unet, tes = meta_models("sd1")
    dims = [str(i % 5) for i in range(25)]  # block 0, 5, 10, 15, 20 get none
    alphas = [str(0.5 + i) for i in range(25)]
    conv_dims = ["2"] * 25
    network = lora.create_network(1.0, 8, 2, None, tes[0], unet, block_dims=",".join(dims),
                                  block_alphas=",".join(alphas), conv_block_dims=",".join(conv_dims))
    assert {m.lora_dim for m in network.text_encoder_loras} == {8}
    assert {float(m.alpha) for m in network.text_encoder_loras} == {2.0}
    seen = set()
    for m in network.unet_loras:
        idx = lora_names.block_index(m.lora_name, False)
        if m.is_conv and m.kernel_size != (1, 1):
            assert (m.lora_dim, float(m.alpha)) == (2, 1.0)
        else:
            assert (m.lora_dim, float(m.alpha)) == (idx % 5, 0.5 + idx)
        seen.add(idx)
    assert 5 not in {lora_names.block_index(m.lora_name, False) for m in network.unet_loras if not m.is_conv
                     or m.kernel_size == (1, 1)}
    assert seen == set(range(1, 25))


def test_conv_block_dims_alone(meta_models):
    unet, tes = meta_models("sd1")
    dims = ["0"] * 12 + ["3"] * 13  # 3x3 convs from the mid block on
    network = lora.create_network(1.0, 4, 1, None, None, unet, conv_block_dims=",".join(dims))
    convs = [m for m in network.unet_loras if m.is_conv and m.kernel_size == (3, 3)]
    assert convs and {m.lora_dim for m in convs} == {3} and {float(m.alpha) for m in convs} == {1.0}
    assert min(lora_names.block_index(m.lora_name, False) for m in convs) == 12
    assert {m.lora_dim for m in network.unet_loras if m not in convs} == {4}


def test_block_index_tables():
    assert lora_names.block_index("lora_unet_down_blocks_0_attentions_1_proj_in", False) == 2
    assert lora_names.block_index("lora_unet_down_blocks_2_downsamplers_0_conv", False) == 9
    assert lora_names.block_index("lora_unet_mid_block_resnets_1_conv1", False) == 12
    assert lora_names.block_index("lora_unet_up_blocks_1_upsamplers_0_conv", False) == 18
    assert lora_names.block_index("lora_unet_up_blocks_3_attentions_2_proj_out", False) == 24
    assert lora_names.block_index("lora_unet_input_blocks_8_1_proj_in", True) == 9
    assert lora_names.block_index("lora_unet_middle_block_2_in_layers_2", True) == 12
    assert lora_names.block_index("lora_unet_output_blocks_8_0_skip_connection", True) == 21
    assert lora_names.block_index("lora_te1_text_model_encoder_layers_0_mlp_fc1", True) == -1


def test_lr_weight_presets_and_groups(meta_models):
    unet, tes = meta_models("sd1")
    network = lora.create_network(1.0, 4, 1, None, tes[0], unet, down_lr_weight="sine", mid_lr_weight="2",
                                  up_lr_weight="1,1,1,0", block_lr_zero_threshold="0.1")
    sine = [math.sin(math.pi / 2 * i / 11) for i in range(12)]
    expected = [w if w > 0.1 else 0.0 for w in sine] + [2.0] + [1, 1, 1, 0] + [1.0] * 8
    assert network.block_lr_weight == pytest.approx(expected)
    blocks = {lora_names.block_index(m.lora_name, False) for m in network.unet_loras}
    # SD1 blocks with transformers: down 1,2,4,5,7,8, mid 12, up 16..24; block 16 has lr weight 0.
    assert blocks == {1, 2, 4, 5, 7, 8, 12} | set(range(17, 25))
    groups, descriptions = network.prepare_optimizer_params(5e-5, 1e-3, 1e-4)
    assert descriptions[0] == "textencoder" and groups[0]["lr"] == 5e-5
    by_name = dict(zip(descriptions, groups))
    for idx in blocks:
        assert by_name[f"unet_block{idx}"]["lr"] == pytest.approx(1e-3 * expected[idx])
    assert len(groups) == 1 + len(blocks)
    assert sum(len(g["params"]) for g in groups) == 2 * len(network.all_loras())


def test_lr_weight_presets_values():
    assert lora._lr_weight_list("cosine+0.5", 3, "x") == pytest.approx([1.5, 0.5 + math.sqrt(0.5), 0.5])
    assert lora._lr_weight_list("reverse_linear", 5, "x") == pytest.approx([1, 0.75, 0.5, 0.25, 0])
    assert lora._lr_weight_list("zeros+0.2", 2, "x") == [0.2, 0.2]
    assert lora._lr_weight_list("1,,0.5", 9, "x") == [1.0, 0.0, 0.5]


def test_sdxl_lr_weights_have_23_entries(meta_models):
    unet, tes = meta_models("sdxl")
    network = lora.create_network(1.0, 4, 1, None, tes, unet, down_lr_weight="0,0,0,0,0,0,0,1,1",
                                  mid_lr_weight="1,0,1", up_lr_weight="linear")
    weights = network.block_lr_weight
    assert len(weights) == 23 and weights[0] == weights[22] == 1.0
    assert weights[11] == 0.0 and weights[13] == 0.0 and weights[21] == 1.0
    blocks = {lora_names.block_index(m.lora_name, True) for m in network.unet_loras}
    assert blocks == {8, 9, 14, 15, 16, 17, 18}  # attention: input 7/8, output 1..5 (output 0 has weight 0)


def test_loraplus_groups_and_zero_lr(tiny):
    models = tiny("sd1")
    network = lora.create_network(1.0, 4, 1, None, models.text_encoders[0], models.unet,
                                  loraplus_lr_ratio="16", loraplus_text_encoder_lr_ratio="4")
    groups, descriptions = network.prepare_optimizer_params(1e-5, None, 1e-4)
    assert descriptions == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-5, 4e-5, 1e-4, 1.6e-3])
    ups = {id(m.lora_up.weight) for m in network.all_loras()}
    assert all(id(p) in ups for p in groups[1]["params"] + groups[3]["params"])
    assert not any(id(p) in ups for p in groups[0]["params"] + groups[2]["params"])
    groups, descriptions = network.prepare_optimizer_params(0.0, 1e-4, 1e-4)
    assert descriptions == ["unet", "unet plus"]


def test_per_text_encoder_lrs(tiny):
    models = tiny("sdxl")
    network = lora.create_network(1.0, 4, 1, None, models.text_encoders, models.unet)
    groups, descriptions = network.prepare_optimizer_params([1e-5, 2e-5], 1e-4, 1e-4)
    assert descriptions == ["textencoder 1", "textencoder 2", "unet"]
    assert [g["lr"] for g in groups] == [1e-5, 2e-5, 1e-4]
    assert len(groups[0]["params"]) == 2 * 72


@pytest.mark.parametrize("kwargs,words", [
    ({"block_dims": "4,4"}, "block_dims"),
    ({"rank_dropout": "1.5"}, "rank_dropout"),
    ({"conv_dim": "four"}, "conv_dim"),
    ({"down_lr_weight": "cosinus"}, "down_lr_weight"),
])
def test_bad_network_args(kwargs, words, tiny):
    models = tiny("sd1")
    with pytest.raises(UserError, match=words):
        lora.create_network(1.0, 4, 1, None, models.text_encoders[0], models.unet, **kwargs)


# --- max-norm regularisation ----------------------------------------------------------------


def test_max_norm_regularization_numbers(tiny):
    models = tiny("sd1")
    network = lora.create_network(1.0, 4, 2, None, models.text_encoders[0], None)
    _randomise_up(network, std=1.0)
    norms = []
    for m in network.all_loras():
        down, up = m.factors()
        norms.append(float((up @ down).detach().norm() * m.scale))
    max_norm = sorted(norms)[len(norms) // 2]
    scaled, mean, largest = network.apply_max_norm_regularization(max_norm, "cpu")
    assert scaled == sum(n > max_norm for n in norms)
    expected = [min(n, max_norm) for n in norms]
    assert mean == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert largest == pytest.approx(max_norm, rel=1e-5)
    with torch.no_grad():
        after = [float((m.factors()[1] @ m.factors()[0]).norm() * m.scale) for m in network.all_loras()]
    assert after == pytest.approx(expected, rel=1e-4)


# --- DyLoRA and LoRA-FA ---------------------------------------------------------------------


def test_dylora_truncates_and_trains_one_unit(tiny):
    models = tiny("sdxl")
    network = dylora.create_network(1.0, 4, 2, None, models.text_encoders, None, unit="2")
    names = list(network._modules)
    assert any(n.startswith("lora_te1_") for n in names) and any(n.startswith("lora_te2_") for n in names)
    _randomise_up(network)
    module = network.text_encoder_loras[0]
    x = torch.randn(1, 3, module.in_dim)
    down, up = module.factors()
    module.eval()
    assert torch.allclose(module.lora_forward(x), x @ down.T @ up.T * 0.5, atol=1e-6)
    module.train()
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        b = int(torch.randint(0, 4, ()).item())
        rank = (b // 2 + 1) * 2
        torch.manual_seed(seed)
        out = module.lora_forward(x)
        expected = x @ down[:rank].T @ up[:, :rank].T * (2 / rank)
        assert torch.allclose(out, expected, atol=1e-6)
        module.zero_grad(set_to_none=True)
        out.sum().backward()
        trained = {n for n, p in module.named_parameters() if p.grad is not None}
        assert trained == {f"lora_down_{rank // 2 - 1}", f"lora_up_{rank // 2 - 1}"}
        seen.add(rank)
    assert seen == {2, 4}
    with pytest.raises(UserError, match="multiple of unit"):
        dylora.create_network(1.0, 5, 1, None, models.text_encoders, None, unit="2")


def test_dylora_state_dict_round_trip(tiny):
    models = tiny("sd1")
    a = dylora.create_network(1.0, 4, 1, None, models.text_encoders[0], models.unet, unit="2", conv_dim="4")
    _randomise_up(a)
    b, _ = dylora.create_network_from_weights(1.0, None, None, models.text_encoders[0], models.unet,
                                              weights_sd=a.state_dict(), unit="2")
    b.load_state_dict(a.state_dict())
    for (ka, va), (kb, vb) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert ka == kb and torch.equal(va, vb)


def test_lora_fa_keeps_down_frozen(tiny):
    models = tiny("sd1")
    network = lora_fa.create_network(1.0, 4, 1, None, models.text_encoders[0], models.unet)
    network.prepare_grad_etc(None, None)
    downs = [m.lora_down.weight for m in network.all_loras()]
    assert not any(p.requires_grad for p in downs)
    trainable = {id(p) for p in network.get_trainable_params()}
    assert trainable == {id(m.lora_up.weight) for m in network.all_loras()}
    groups, _ = network.prepare_optimizer_params(1e-4, 1e-4, 1e-4)
    assert {id(p) for g in groups for p in g["params"]} == trainable
    attention = [m.lora_down.weight for m in network.text_encoder_loras if "self_attn" in m.lora_name]
    assert {tuple(w.shape) for w in attention} == {(4, 32)}
    values = torch.cat([w.flatten() for w in attention])
    assert float(values.std()) == pytest.approx(math.sqrt(2 / 36), rel=0.1)


def test_a_dataset_network_multiplier_holds_for_its_batches_only():
    """A batch of a dataset with network_multiplier 0.5 scales the LoRA; the next batch of a 1.0 dataset
    puts the run's --network_multiplier back."""
    from types import SimpleNamespace

    from library.training.task_network import NetworkTask

    class Network:
        def __init__(self):
            self.calls = []

        def set_multiplier(self, value):
            self.calls.append(value)

    task = NetworkTask(sdxl=False)
    task.network, task._batch_multiplier = Network(), 0.8
    run = SimpleNamespace(args=SimpleNamespace(network_multiplier=0.8))
    for batch_multipliers in ([1.0, 1.0], [0.5, 0.5], [0.5, 0.5], [1.0, 1.0]):
        task.before_step(run, {"network_multipliers": torch.tensor(batch_multipliers)})
    assert task.network.calls == [0.4, 0.8]
