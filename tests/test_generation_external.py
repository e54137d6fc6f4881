"""Generation with networks our trainer made, on a tiny SD1 model built directly with transformers/diffusers
(conftest `external_sd1`: its CLIP text encoder's final layer norm has zero bias, so its output has a mean
of ~0): prompt-weight normalisation, the stop on non-finite values, and LyCORIS files (LoCon, LoHa, LoKr)
applied dynamically and merged, compared with the change computed here from each file's factors."""

import logging
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.generation.engine import BatchSettings, GenerationEngine, ImageJob, NonFiniteOutput
from library.generation.loading import load_networks
from library.models.loading import load_models
from library.text.tokenizer import load_tokenizers

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]
SETTINGS = BatchSettings(64, 64, steps=1, sampler="euler")
PROMPTS = [f"{a} {b}" for a in ("a", "cat", "dog", "red", "blue", "photo", "house", "tree", "girl", "moon")
           for b in ("a", "of", "the", "on", "in", "car", "sky", "sun", "boy", "cat")]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def trained(external_sd1, tmp_path_factory, write_photos):
    """train(name, *flags) -> a network file our train_network.py made on the external model (2 steps)."""
    import train_network

    root = tmp_path_factory.mktemp("ext-train")
    write_photos(str(root / "data" / "2_photo"), PHOTOS, lambda i: (64, 64), caption=lambda n: f"a photo of {n}")
    made = {}

    def train(name, *flags):
        if name not in made:
            out = str(root / "out")
            assert train_network.main([
                "--pretrained_model_name_or_path", external_sd1, "--train_data_dir", str(root / "data"),
                "--output_dir", out, "--output_name", name, "--resolution", "64", "--train_batch_size", "2",
                "--caption_extension", ".txt", "--network_dim", "4", "--learning_rate", "1e-3",
                "--max_train_steps", "2", "--seed", "1", "--max_data_loader_n_workers", "0", *flags]) == 0
            made[name] = os.path.join(out, name + ".safetensors")
        return made[name]

    return train


def _models(folder):
    models = load_models(folder)
    return models, load_tokenizers(models.family, folder)


def _network_args(module, path, merge=False, mul=None):
    return SimpleNamespace(network_module=[module], network_weights=[path], network_mul=mul, network_args=None,
                           network_show_meta=False, network_merge=merge, network_merge_n_models=None,
                           network_pre_calc=False)


def _latents(models, tokenizers, networks=(), prompt="a photo of a cat"):
    engine = GenerationEngine(models, tokenizers, "cpu", networks=networks)
    return engine.generate([ImageJob(prompt, "", 5)], SETTINGS, output="latent")


# --- 7: a text encoder whose output has a mean of 0 --------------------------------------------------------

@pytest.fixture(scope="module")
def dynamic_lora(external_sd1, trained):
    """(LoRA file, engine with it applied dynamically, prompts whose gen_img batch [prompt, ""] has a text-encoder
    output of mean exactly 0 in some row: 0/0 for the mean-restoring rescale of --emb_normalize_mode original)."""
    lora = trained("lora", "--network_module", "networks.lora")
    models, tokenizers = _models(external_sd1)
    networks, _ = load_networks(_network_args("networks.lora", lora), models, torch.float32, torch.device("cpu"))
    engine = GenerationEngine(models, tokenizers, "cpu", networks=networks)
    with torch.no_grad():
        zero_mean = [p for p in PROMPTS if (engine.conditioner.encode_weighted([p, ""], normalize="none").context
                                            .mean(dim=(1, 2)) == 0).any()]
    assert zero_mean, "no prompt gave an exactly-zero mean: the case these tests are about did not occur"
    yield lora, engine, zero_mean
    for network in networks:
        network.unapply()


def test_zero_mean_encoder_with_a_dynamic_lora_encodes_finitely(dynamic_lora):
    _, engine, zero_mean = dynamic_lora
    with torch.no_grad():
        for prompt in zero_mean:
            plain = engine.conditioner.encode_weighted([prompt, ""], normalize="none").context
            original = engine.conditioner.encode_weighted([prompt, ""], normalize="original").context
            assert torch.equal(original, plain)  # weights all 1: exactly the unweighted encoding, no 0/0

        # a weighted prompt: the mean is rounding noise, so the rescale keeps the mean |x| instead
        plain = engine.conditioner.encode_weighted(["a photo of a cat"], normalize="none").context
        weighted = engine.conditioner.encode_weighted(["a photo of a (cat:1.3)"], normalize="original").context
    assert plain.mean().abs() < 1e-6 * plain.abs().mean()
    assert torch.isfinite(weighted).all()
    assert weighted.abs().mean().item() == pytest.approx(plain.abs().mean().item(), rel=1e-5)


def test_gen_img_with_a_dynamic_lora_on_the_external_model_saves_real_images(external_sd1, dynamic_lora, tmp_path):
    import numpy as np
    from PIL import Image

    import gen_img

    lora, _, zero_mean = dynamic_lora
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(zero_mean[:3]) + "\n", encoding="utf-8")
    out = tmp_path / "images"
    assert gen_img.main(["--ckpt", external_sd1, "--outdir", str(out), "--from_file", str(prompts), "--W", "64",
                         "--H", "64", "--steps", "2", "--sampler", "euler_a", "--seed", "3",
                         "--network_module", "networks.lora", "--network_weights", lora]) == 0
    files = sorted(os.listdir(out))
    assert len(files) == len(zero_mean[:3])
    for name in files:
        pixels = np.asarray(Image.open(out / name), dtype=np.float32)
        assert pixels.std() > 5.0, name  # an image, not a flat (NaN-cast black) one


def _scaled_copy(path, target, select, factor):
    tensors = load_file(path)
    for key in tensors:
        if select(key) and key.endswith("lora_up.weight"):
            tensors[key] = tensors[key] * factor
    save_file(tensors, str(target))
    return str(target)


@pytest.mark.parametrize("part, message", [
    ("lora_te", r"before step 1: the text encoder's output for the prompt 'a cat' is not finite"),
    ("lora_unet", r"at step 1 of 1: the latents are not finite"),
])
def test_non_finite_values_stop_generation_and_save_nothing(external_sd1, trained, tmp_path, part, message):
    import gen_img

    lora = trained("lora", "--network_module", "networks.lora")
    overflow = _scaled_copy(lora, tmp_path / "overflow.safetensors", lambda k: k.startswith(part), 1e36)
    out = tmp_path / "images"
    with pytest.raises(NonFiniteOutput, match=message):
        gen_img.main(["--ckpt", external_sd1, "--outdir", str(out), "--prompt", "a cat", "--W", "64", "--H", "64",
                      "--steps", "1", "--network_module", "networks.lora", "--network_weights", overflow])
    assert not out.exists() or not os.listdir(out)


def test_a_network_file_holding_nan_is_refused_when_read(external_sd1, trained, tmp_path):
    lora = trained("lora", "--network_module", "networks.lora")
    tensors = load_file(lora)
    key = sorted(k for k in tensors if k.endswith("lora_down.weight"))[3]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"))
    models, _ = _models(external_sd1)
    with pytest.raises(UserError, match=rf"nan.safetensors: tensor {key} holds 1 NaN/inf"):
        load_networks(_network_args("networks.lora", str(tmp_path / "nan.safetensors")), models, torch.float32,
                      torch.device("cpu"))


def test_a_non_finite_sample_image_is_reported_not_saved(external_sd1, tmp_path, caplog):
    from library.generation.sampling import sample_images

    models, tokenizers = _models(external_sd1)
    with torch.no_grad():
        models.unet.conv_out.bias.fill_(float("nan"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --w 64 --h 64 --s 2 --d 1\n", encoding="utf-8")
    run = SimpleNamespace(args=SimpleNamespace(output_name="run"), models=models, tokenizers=tokenizers,
                          device=torch.device("cpu"))
    with caplog.at_level(logging.ERROR):
        assert sample_images(run, 10, None, str(prompts), "euler", str(tmp_path)) == []
    assert "sample 0 not saved: generation stopped at step 1 of 2: the latents are not finite" in caplog.text
    assert not os.listdir(tmp_path / "sample")


# --- 14: LyCORIS files made by our trainer -----------------------------------------------------------------

def _layers(models):
    """LoRA module name → base layer, named as the files name them (classic `text_model.` path)."""
    layers = {}
    for prefix, root, path in (("lora_te", models.text_encoders[0], "text_model."), ("lora_unet", models.unet, "")):
        for name, module in root.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                layers[f"{prefix}_{(path + name).replace('.', '_')}"] = module
    return layers


def _delta(factors, shape):
    """The weight change a LyCORIS module of the file makes (multiplier 1), from its factors alone."""
    f = {k: v.double() for k, v in factors.items()}
    alpha = float(f["alpha"])
    if "lora_down.weight" in f:  # LoCon
        down, up = f["lora_down.weight"], f["lora_up.weight"]
        return (up.flatten(1) @ down.flatten(1)).reshape(shape) * alpha / down.shape[0]
    if "hada_w1_a" in f:  # LoHa: Hadamard product of two low-rank products
        rank = f["hada_w1_b"].shape[0]
        return ((f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])).reshape(shape) * alpha / rank
    # LoKr: Kronecker product; a decomposed factor brings the rank and the alpha/rank scale
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    else:
        w2 = (f["lokr_w2_a"] @ f["lokr_w2_b"]).reshape(shape[0] // w1.shape[0], shape[1] // w1.shape[1], *shape[2:])
    rank = f["lokr_w1_a"].shape[1] if "lokr_w1_a" in f else f["lokr_w2_a"].shape[1] if "lokr_w2_a" in f else None
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2) * (alpha / rank if rank else 1.0)


def _expected_models(folder, path, select=lambda name: True):
    """The base model with each selected module's change added to its layer, here, without any plugin."""
    models, tokenizers = _models(folder)
    tensors = load_file(path)
    modules = {}
    for key, value in tensors.items():
        name, _, leaf = key.partition(".")
        modules.setdefault(name, {})[leaf] = value
    layers = _layers(models)
    assert set(modules) <= set(layers)
    with torch.no_grad():
        for name, factors in modules.items():
            if select(name):
                weight = layers[name].weight
                weight += _delta(factors, weight.shape).to(weight.dtype)
    return models, tokenizers, {name for name in modules if select(name)}


LYCORIS = [("locon", "algo=locon"), ("loha", "algo=loha"), ("lokr", "algo=lokr")]


@pytest.fixture(scope="module")
def base_latents(external_sd1):
    return _latents(*_models(external_sd1))


@pytest.mark.parametrize("name, algo", LYCORIS, ids=[n for n, _ in LYCORIS])
def test_lycoris_file_applied_dynamically_makes_the_expected_change(external_sd1, trained, base_latents, name, algo):
    pytest.importorskip("lycoris")
    path = trained(name, "--network_module", "lycoris.kohya", "--network_args", algo)
    assert any(k.startswith("lora_te_text_model_") for k in load_file(path))
    models, tokenizers = _models(external_sd1)
    networks, _ = load_networks(_network_args("lycoris.kohya", path), models, torch.float32, torch.device("cpu"))
    assert len(networks[0].text_encoder_loras) == 12  # every text-encoder module of the file found its layer
    dynamic = _latents(models, tokenizers, networks)
    expected = _latents(*_expected_models(external_sd1, path)[:2])
    change = (expected - base_latents).abs().max()
    assert change > 1e-3  # the file changes the image
    assert (dynamic - expected).abs().max() < 1e-3 * change


def test_lycoris_locon_file_merged_makes_the_expected_change(external_sd1, trained):
    pytest.importorskip("lycoris")
    path = trained("locon", "--network_module", "lycoris.kohya", "--network_args", "algo=locon")
    base, _ = _models(external_sd1)
    merged, _ = _models(external_sd1)
    assert load_networks(_network_args("lycoris.kohya", path, merge=True), merged, torch.float32,
                         torch.device("cpu")) == ([], [])
    expected, _, checked = _expected_models(external_sd1, path)
    base_layers, merged_layers, expected_layers = _layers(base), _layers(merged), _layers(expected)
    assert len([n for n in checked if n.startswith("lora_te_")]) == 12  # the text-encoder part is merged too
    for module in checked:
        want, got = expected_layers[module].weight.detach(), merged_layers[module].weight.detach()
        change = (want - base_layers[module].weight.detach()).abs().max()
        assert change > 0 and torch.allclose(got, want, atol=1e-4 * float(change)), module


@pytest.mark.parametrize("name, algo", LYCORIS[1:], ids=[n for n, _ in LYCORIS[1:]])
def test_lycoris_file_merged_changes_the_text_encoder_too(external_sd1, trained, name, algo):
    """LoHa and LoKr merges: every text-encoder module of the file changes its layer, in the direction of the
    change computed here (the size of a merged LoHa/LoKr change is the merge arithmetic's own matter)."""
    pytest.importorskip("lycoris")
    path = trained(name, "--network_module", "lycoris.kohya", "--network_args", algo)
    base, _ = _models(external_sd1)
    merged, _ = _models(external_sd1)
    load_networks(_network_args("lycoris.kohya", path, merge=True), merged, torch.float32, torch.device("cpu"))
    expected, _, checked = _expected_models(external_sd1, path, lambda n: n.startswith("lora_te_"))
    assert len(checked) == 12
    base_layers, merged_layers, expected_layers = _layers(base), _layers(merged), _layers(expected)
    for module in checked:
        want = (expected_layers[module].weight - base_layers[module].weight).detach().flatten().double()
        got = (merged_layers[module].weight - base_layers[module].weight).detach().flatten().double()
        assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.999, module


def test_gen_img_command_line_with_a_lycoris_file(external_sd1, trained, tmp_path):
    pytest.importorskip("lycoris")
    import gen_img

    path = trained("loha", "--network_module", "lycoris.kohya", "--network_args", "algo=loha")
    out = tmp_path / "dynamic"
    assert gen_img.main(["--ckpt", external_sd1, "--outdir", str(out), "--prompt", "a cat", "--W", "64", "--H", "64",
                         "--steps", "1", "--network_module", "lycoris.kohya", "--network_weights", path]) == 0
    assert len(os.listdir(out)) == 1
    models, _ = _models(external_sd1)
    args = _network_args("lycoris.kohya", path)
    args.network_pre_calc = True
    with pytest.raises(UserError, match="--network_pre_calc: lycoris.kohya networks cannot pre-calculate"):
        load_networks(args, models, torch.float32, torch.device("cpu"))


def test_gen_img_outdir_that_is_a_file_is_refused_before_the_model_loads(external_sd1, tmp_path, monkeypatch):
    import gen_img
    import library.generation.run

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad --outdir was refused")

    monkeypatch.setattr(library.generation.run, "build_engine", refuse)
    (tmp_path / "out").write_text("notes")
    with pytest.raises(UserError, match=r"^--outdir .*out: is a file, not a folder; give a folder to save into$"):
        gen_img.main(["--ckpt", external_sd1, "--outdir", str(tmp_path / "out"), "--prompt", "a cat"])
