"""Weight changes of LoRA and LyCORIS modules (library/models/network_deltas.py) against the plain formulas
written out here and against lycoris-lora's own forward pass, and the two merges that use them outside the
tools: `--base_weights` in the trainers and `gen_img.py --network_merge`."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from library.errors import UserError
from library.models import network_deltas

lycoris = pytest.importorskip("lycoris", reason="lycoris-lora builds the LyCORIS modules these tests check")


def _random(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return module


# The plain formulas, written from the LyCORIS papers' definitions rather than from our code.
def plain_change(parts, shape):
    t = {k: v.double() for k, v in parts.items()}
    if "lora_mid.weight" in t:  # Tucker: W[o, i, ...] = Σ up[o, a] · mid[a, b, ...] · down[b, i]
        up, down = t["lora_up.weight"][:, :, 0, 0], t["lora_down.weight"][:, :, 0, 0]
        change, rank = torch.einsum("oa,ab...,bi->oi...", up, t["lora_mid.weight"], down), down.shape[0]
    elif "lora_down.weight" in t:
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        change = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)
        rank = down.shape[0]
    elif "hada_w1_a" in t:
        if "hada_t1" in t:  # each Hadamard factor is a Tucker product: t[a, b, ...] · w_a[a, o] · w_b[b, i]
            f1 = torch.einsum("ab...,ao,bi->oi...", t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            f2 = torch.einsum("ab...,ao,bi->oi...", t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            f1, f2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
        change, rank = (f1 * f2).reshape(shape), t["hada_w1_b"].shape[0]
    else:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("ab...,ao,bi->oi...", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        # Kronecker product over the first two axes, written index by index
        a, c = w1.shape
        if len(shape) == 4 and w2.dim() == 2:  # LyCORIS keeps the kernel flattened into the columns
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
        b, d = w2.shape[:2]
        change = torch.einsum("ac,bd...->abcd...", w1, w2).reshape(a * b, c * d, *w2.shape[2:])
        decomposed = [k for k in ("lokr_w1_b", "lokr_w2_b") if k in t]
        rank = t[decomposed[0]].shape[0] if decomposed else None
    alpha = float(t["alpha"]) if "alpha" in t else rank
    scale = alpha / rank if rank else 1.0
    return (change * scale).reshape(shape)


LINEAR, CONV = (lambda: torch.nn.Linear(64, 96)), (lambda: torch.nn.Conv2d(32, 64, 3, padding=1))
CASES = [
    ("locon linear", "LoConModule", LINEAR, dict(lora_dim=4, alpha=2)),
    ("locon conv", "LoConModule", CONV, dict(lora_dim=4, alpha=2)),
    ("locon conv tucker", "LoConModule", CONV, dict(lora_dim=4, alpha=3, use_tucker=True)),
    ("loha linear", "LohaModule", LINEAR, dict(lora_dim=4, alpha=2)),
    ("loha conv", "LohaModule", CONV, dict(lora_dim=4, alpha=2)),
    ("loha conv tucker", "LohaModule", CONV, dict(lora_dim=4, alpha=2, use_tucker=True)),
    ("lokr linear, second factor decomposed", "LokrModule", LINEAR, dict(lora_dim=4, alpha=2, factor=4)),
    ("lokr linear, both decomposed", "LokrModule", LINEAR, dict(lora_dim=2, alpha=3, factor=8, decompose_both=True)),
    ("lokr linear, full factors", "LokrModule", lambda: torch.nn.Linear(16, 16), dict(lora_dim=100, alpha=3, factor=4)),
    ("lokr conv", "LokrModule", CONV, dict(lora_dim=4, alpha=2, factor=4)),
    ("lokr conv tucker", "LokrModule", CONV, dict(lora_dim=4, alpha=2, factor=4, use_tucker=True)),
]


def _lycoris_module(cls_name, layer, kwargs, seed=0):
    from lycoris import modules

    module = _random(getattr(modules, cls_name)("m", layer, 1.0, **kwargs), seed)
    return module, {k: v.detach().clone() for k, v in module.state_dict().items()}


def _layer_out(layer, weight, x):
    if isinstance(layer, torch.nn.Conv2d):
        return F.conv2d(x, weight, layer.bias, padding=layer.padding)
    return F.linear(x, weight, layer.bias)


@pytest.mark.parametrize("title,cls_name,make_layer,kwargs", CASES, ids=[c[0] for c in CASES])
def test_change_is_the_plain_formula_and_what_lycoris_forward_applies(title, cls_name, make_layer, kwargs):
    torch.manual_seed(0)
    layer = make_layer()
    module, parts = _lycoris_module(cls_name, layer, kwargs)
    shape = tuple(layer.weight.shape)
    change = network_deltas.delta_weight(parts, shape)
    assert torch.allclose(change.double(), plain_change(parts, shape), rtol=1e-5, atol=1e-6)
    assert change.abs().max() > 1e-3

    x = torch.randn(2, *(shape[1:2] + (8, 8) if len(shape) == 4 else shape[1:]))
    module.apply_to()
    dynamic = module(x)  # lycoris' own forward: base layer plus the module's change
    merged = network_deltas.merge_weight(layer.weight, parts, 1.0)
    assert torch.allclose(_layer_out(layer, merged, x), dynamic, atol=2e-5)


def test_lycoris_merge_to_scales_lokr_and_loha_twice():
    """lycoris-lora 3.4.0's merged weight differs from its own forward by the module scale (here 1/2);
    we merge what the forward applies."""
    torch.manual_seed(0)
    for cls_name, kwargs in (("LokrModule", dict(lora_dim=4, alpha=2, factor=4)), ("LohaModule", dict(lora_dim=4, alpha=2))):
        layer = torch.nn.Linear(64, 96)
        module, parts = _lycoris_module(cls_name, layer, kwargs)
        theirs = module.get_merged_weight(1.0, layer.weight.shape)[0] - layer.weight
        ours = network_deltas.merge_weight(layer.weight, parts, 1.0) - layer.weight
        assert network_deltas.module_scale(parts) == 0.5
        assert torch.allclose(theirs, ours * 0.5, atol=1e-6)


@pytest.mark.parametrize("cls_name", ["LoConModule", "LohaModule"])
def test_dora_merge_matches_lycoris_forward_and_scales_from_the_base(cls_name):
    torch.manual_seed(1)
    layer = torch.nn.Linear(64, 96)
    module, parts = _lycoris_module(cls_name, layer, dict(lora_dim=4, alpha=2, weight_decompose=True), seed=3)
    x = torch.randn(3, 64)
    module.apply_to()
    assert torch.allclose(_layer_out(layer, network_deltas.merge_weight(layer.weight, parts, 1.0), x), module(x), atol=2e-5)
    assert torch.equal(network_deltas.merge_weight(layer.weight, parts, 0.0), layer.weight.detach())
    half = network_deltas.merge_weight(layer.weight, parts, 0.5)
    full = network_deltas.merge_weight(layer.weight, parts, 1.0)
    assert torch.allclose(half, (layer.weight + full) / 2, atol=1e-6)


def test_forms_without_a_formula_and_misfits_are_one_line_errors():
    with pytest.raises(UserError, match="OFT"):
        network_deltas.module_kind({"oft_blocks": torch.zeros(4, 2, 2)}, "m")
    with pytest.raises(UserError, match="not a LoRA or LyCORIS"):
        network_deltas.module_kind({"foo": torch.zeros(1)}, "m")
    parts = {"lora_down.weight": torch.zeros(4, 32), "lora_up.weight": torch.zeros(64, 4)}
    with pytest.raises(UserError, match=r"shape \(64, 32\).*\(64, 48\)"):
        network_deltas.check_fits(parts, (64, 48), "m")
    network_deltas.check_fits(parts, (64, 32, 1, 1), "m")  # a 1x1 conv takes a Linear-shaped change


# ------------------------------------------------------------------------------------------------
# the merges outside the tools


@pytest.fixture(scope="module")
def lycoris_sd1(tiny_checkpoint, tmp_path_factory):
    """A tiny SD1 model and a LoKr file trained-shaped by lycoris.kohya on it (random factors)."""
    from lycoris import kohya

    from library.models.loading import load_models
    from library.models.safetensors_io import load_tensors
    from library.models.text_encoder_view import classic_view

    path = tiny_checkpoint("sd1")
    models = load_models(path)
    te = classic_view(models.text_encoders[0])
    network = kohya.create_network(1.0, 4, 2, models.vae, te, models.unet, algo="lokr", factor=4)
    network.apply_to(te, models.unet, True, True)  # lycoris registers its modules here
    _random(network, 5)
    lora = str(tmp_path_factory.mktemp("lycoris") / "lokr.safetensors")
    network.save_weights(lora, torch.float32, {})
    tensors = load_tensors(lora)
    assert any(".lokr_w2_a" in k for k in tensors) and any(k.startswith("lora_te_") for k in tensors)
    return path, lora


def _lycoris_reference(path, lora, multiplier):
    """The model with the LoKr file applied dynamically by lycoris itself."""
    from lycoris import kohya

    from library.models.loading import load_models
    from library.models.text_encoder_view import classic_view

    models = load_models(path)
    te = classic_view(models.text_encoders[0])
    network, weights = kohya.create_network_from_weights(multiplier, lora, models.vae, te, models.unet)
    network.apply_to(te, models.unet, True, True)
    network.load_state_dict(weights, strict=False)
    return models


def _outputs(models):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49407, (1, 77), generator=generator)
    with torch.no_grad():
        hidden = models.text_encoders[0](ids).last_hidden_state
        sample = torch.randn(1, 4, 16, 16, generator=generator)
        return hidden, models.unet(sample, 10, encoder_hidden_states=hidden).sample


def test_gen_img_network_merge_of_lycoris_equals_lycoris_forward(lycoris_sd1, tmp_path):
    from library.generation.loading import load_networks
    from library.models.loading import load_models

    path, lora = lycoris_sd1
    merged = load_models(path)
    args = SimpleNamespace(network_module=["lycoris.kohya"], network_weights=[lora], network_mul=[0.6],
                           network_args=None, network_show_meta=False, network_merge=True,
                           network_merge_n_models=None, network_pre_calc=False)
    assert load_networks(args, merged, torch.float32, torch.device("cpu")) == ([], [])
    reference = _lycoris_reference(path, lora, 0.6)
    for ours, theirs in zip(_outputs(merged), _outputs(reference)):
        assert torch.allclose(ours, theirs, atol=1e-4 * theirs.abs().max())
    assert not torch.allclose(_outputs(merged)[1], _outputs(load_models(path))[1], atol=1e-3)


def test_base_weights_of_lycoris_merge_what_lycoris_applies(lycoris_sd1):
    from library.models.loading import load_models
    from library.training.task_network import NetworkTask

    path, lora = lycoris_sd1
    models = load_models(path)
    args = SimpleNamespace(base_weights=[lora], base_weights_multiplier=[0.8], network_module="lycoris.kohya")
    NetworkTask(sdxl=False).merge_base_weights(models, args, SimpleNamespace(weight_dtype=torch.float32))
    reference = _lycoris_reference(path, lora, 0.8)
    for ours, theirs in zip(_outputs(models), _outputs(reference)):
        assert torch.allclose(ours, theirs, atol=1e-4 * theirs.abs().max())


def test_merge_into_models_refuses_a_file_for_another_family_and_changes_nothing(lycoris_sd1, tiny_checkpoint):
    from library.models import network_merge
    from library.models.loading import load_models
    from library.models.safetensors_io import load_tensors

    _, lora = lycoris_sd1
    models = load_models(tiny_checkpoint("sdxl"))
    before = {k: v.clone() for k, v in models.unet.state_dict().items()}
    with pytest.raises(UserError, match="modules match no layer of this Stable Diffusion XL"):
        network_merge.merge_into_models(load_tensors(lora), models.text_encoders, models.unet, 1.0, lora,
                                        models.family.title)
    assert all(torch.equal(before[k], v) for k, v in models.unet.state_dict().items())
