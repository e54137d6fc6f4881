"""Loading and saving whole models: every family in every format, bit-exact, and equal outputs."""

import json
import os

import pytest
import torch

from library.models import checkpoint_io, safetensors_io
from library.errors import UserError
from library.models.families import FAMILIES, get_family
from library.models.loading import load_models
from library.models.saving import FORMATS, original_state_dict, save_models
from library.models.random_models import build_random_models

FAMILY_NAMES = ["sd1", "sd2", "sdxl"]


def component_states(models):
    out = {"unet": models.unet.state_dict(), "vae": models.vae.state_dict()}
    for i, te in enumerate(models.text_encoders):
        out[f"te{i}"] = te.state_dict()
    return out


def assert_same_weights(a, b):
    sa, sb = component_states(a), component_states(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].keys() == sb[name].keys(), name
        for k in sa[name]:
            assert sa[name][k].dtype == sb[name][k].dtype, (name, k)
            assert torch.equal(sa[name][k], sb[name][k]), (name, k)


def outputs(models, seed=0, dtype=torch.float32, vae=True):
    """U-Net, VAE (unless `vae` is False) and text-encoder outputs on fixed inputs (`dtype`: the
    models' float dtype)."""
    g = torch.Generator().manual_seed(seed)
    family = models.family
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    with torch.no_grad():
        te_out = [te(ids, output_hidden_states=True) for te in models.text_encoders]
        hidden = torch.cat([o.hidden_states[-2] for o in te_out], dim=-1)
        latents = torch.randn(1, 4, 8, 8, generator=g).to(dtype)
        kwargs = {}
        if family.is_sdxl:
            pooled = te_out[1].text_embeds
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]], dtype=dtype)}
        unet_out = models.unet(latents, torch.tensor([500]), hidden, **kwargs).sample
        if not vae:
            return [unet_out] + [o.last_hidden_state for o in te_out]
        image = models.vae.decode(latents).sample
        encoded = models.vae.encode(image).latent_dist.mean
    return [unet_out, image, encoded] + [o.last_hidden_state for o in te_out]


@pytest.fixture(scope="module")
def random_models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_random_models(get_family(name), "tiny", seed=1)
        return cache[name]

    return get


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_every_format_is_bit_exact(family, fmt, random_models, tmp_path):
    models = random_models(family)
    path = str(tmp_path / ("model" + {"ckpt": ".ckpt", "safetensors": ".safetensors"}.get(fmt, "")))
    save_models(models, path, fmt)
    loaded = load_models(path)
    assert loaded.family.name == family
    assert_same_weights(models, loaded)
    for a, b in zip(outputs(models), outputs(loaded)):
        assert torch.equal(a, b)


def _file_maps(path: str) -> list:
    """Address ranges of this process's memory maps of `path` (Linux /proc/self/maps)."""
    real, ranges = os.path.realpath(path), []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == real:
                ranges.append(tuple(int(x, 16) for x in parts[0].split("-")))
    return ranges


def _mapped(t: torch.Tensor, ranges: list) -> bool:
    return any(lo <= t.data_ptr() < hi for lo, hi in ranges)


def _shared_storage_parameters(models) -> list:
    """Parameters that are views or share a storage (what task_full._own_storage gives their own)."""
    return sorted(
        f"{label}.{name}"
        for label, module in component_modules(models)
        for name, p in module.named_parameters()
        if p._is_view() or p.untyped_storage().nbytes() > p.numel() * p.element_size()
    )


def component_modules(models):
    return [("unet", models.unet), ("vae", models.vae)] + [(f"te{i}", te) for i, te in enumerate(models.text_encoders)]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_zero_copy_fp16_load_equals_the_copying_load(family, random_models, tmp_path, monkeypatch):
    """An fp16 file loaded into an fp16 model maps the file (copy-on-write) instead of copying it:
    same weights, same views, same outputs as a copying load; training-like in-place changes to the
    model never reach the file."""
    path = str(tmp_path / "half.safetensors")
    save_models(random_models(family), path, precision=torch.float16)
    with open(path, "rb") as f:
        before = f.read()
    mapped = load_models(path, dtype=torch.float16)
    monkeypatch.setattr(safetensors_io, "ZERO_COPY_DEFAULT", False)
    copied = load_models(path, dtype=torch.float16)
    assert_same_weights(mapped, copied)
    params = [p for _, module in component_modules(mapped) for p in module.parameters()]
    ranges = _file_maps(path)
    on_file = sum(p.numel() for p in params if _mapped(p, ranges))
    assert on_file > 0.99 * sum(p.numel() for p in params)
    assert not any(_mapped(p, ranges) for _, module in component_modules(copied) for p in module.parameters())
    assert _shared_storage_parameters(mapped) == _shared_storage_parameters(copied)
    vae = family == "sd1"  # the same VAE in every family, and slow in fp16 on a CPU (4 s)
    for a, b in zip(outputs(mapped, dtype=torch.float16, vae=vae), outputs(copied, dtype=torch.float16, vae=vae)):
        assert torch.equal(a, b)
    with torch.no_grad():
        for p in params:
            p.mul_(0.5).add_(1)  # as an optimizer step would
    with open(path, "rb") as f:
        assert f.read() == before
    again = load_models(path, dtype=torch.float16)
    assert_same_weights(again, copied)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_single_file_load_save_keeps_every_tensor(family, tiny_checkpoint, tmp_path):
    src = tiny_checkpoint(family)
    out = str(tmp_path / "resaved.safetensors")
    save_models(load_models(src), out)
    a = safetensors_io.load_tensors(src)
    b = safetensors_io.load_tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_extra_keys_of_a_source_file_survive(tiny_checkpoint, tmp_path):
    src = safetensors_io.load_tensors(tiny_checkpoint("sd1"))
    src["model_ema.decay"] = torch.tensor(0.9999)
    src["logvar"] = torch.zeros(1000)
    path = str(tmp_path / "with_extras.ckpt")
    checkpoint_io.save_pickle_checkpoint({"state_dict": src, "epoch": 3, "global_step": 42}, path)
    out = str(tmp_path / "out.ckpt")
    save_models(load_models(path, keep_ema=True), out, epoch=1, global_step=8)
    saved = torch.load(out, weights_only=True)
    assert saved["epoch"] == 4 and saved["global_step"] == 50
    assert torch.equal(saved["state_dict"]["model_ema.decay"], torch.tensor(0.9999))
    assert saved["state_dict"].keys() == src.keys()


@pytest.mark.parametrize("precision", [torch.float16, torch.bfloat16])
def test_precision_on_load_and_save(precision, tiny_checkpoint, tmp_path):
    models = load_models(tiny_checkpoint("sd1"), dtype=precision)
    assert next(models.unet.parameters()).dtype == precision
    assert next(models.text_encoders[0].parameters()).dtype == precision
    out = str(tmp_path / "half.safetensors")
    save_models(models, out, precision=precision)
    tensors = safetensors_io.load_tensors(out)
    assert tensors["model.diffusion_model.out.2.weight"].dtype == precision
    assert tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64


def test_sdxl_text_projection_is_transposed_into_hf_layout(tiny_checkpoint):
    """OpenCLIP applies x @ P; the HF Linear applies x @ W.T, so W must be P.T (sd-scripts skips this)."""
    path = tiny_checkpoint("sdxl")
    p = safetensors_io.load_tensors(path, select=lambda k: k.endswith("1.model.text_projection"))
    proj = p["conditioner.embedders.1.model.text_projection"]
    models = load_models(path)
    assert torch.equal(models.text_encoders[1].text_projection.weight, proj.T)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_diffusers_pipeline_opens_our_folder(family, random_models, tmp_path):
    import diffusers

    models = random_models(family)
    out = str(tmp_path / "pipe")
    save_models(models, out, "diffusers_safetensors")
    cls = getattr(diffusers, models.family.diffusers_pipeline)
    pipe = cls.from_pretrained(out, local_files_only=True)
    assert torch.equal(pipe.unet.conv_in.weight, models.unet.conv_in.weight)
    te_files = safetensors_io.read_header(os.path.join(out, "text_encoder", "model.safetensors")).tensors
    assert "text_model.embeddings.token_embedding.weight" in te_files  # classic key names
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert index["_class_name"] == models.family.diffusers_pipeline


def test_v_parameterization_travels_with_the_model(tmp_path):
    models = build_random_models(get_family("sd2"), "tiny", seed=0, v_parameterization=True)
    single = str(tmp_path / "v.safetensors")
    save_models(models, single)
    assert load_models(single).v_parameterization is True
    assert load_models(single, v_parameterization=False).v_parameterization is False
    folder = str(tmp_path / "vdir")
    save_models(models, folder)
    cfg = json.load(open(os.path.join(folder, "scheduler", "scheduler_config.json")))
    assert cfg["prediction_type"] == "v_prediction"
    assert load_models(folder).v_parameterization is True


# --- fixtures: the original layouts, at full size on the meta device ------------------------

FIXTURE_FILES = {"sd1": "sd15.json", "sd2": "sd21v.json", "sdxl": "sdxl_base.json"}
OPTIONAL = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_", "log_one_minus", "posterior_", "denoiser.sigmas")


def full_size_meta_models(family):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from library.models import clip_convert, unet_convert, vae_convert
    from library.models.loading import StableDiffusionModels

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_convert.unet_config(family, "full"))
        vae = AutoencoderKL.from_config(vae_convert.vae_config(family, "full"))
    tes = [clip_convert.build_text_encoder(clip_convert.clip_config(s, "full"), s, device="meta") for s in family.text_encoders]
    return StableDiffusionModels(family=family, unet=unet, vae=vae, text_encoders=tes)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_full_size_single_file_matches_the_original_layout(family, fixtures_dir):
    fixture = json.load(open(os.path.join(fixtures_dir, "checkpoint-keys", FIXTURE_FILES[family])))["keys"]
    sd = original_state_dict(full_size_meta_models(FAMILIES[family]))
    ours = {k: list(v.shape) for k, v in sd.items()}
    required = {k: v for k, v in fixture.items() if not k.startswith(OPTIONAL)}
    missing = sorted(set(required) - set(ours))
    extra = sorted(set(ours) - set(fixture))
    assert not missing and not extra, (missing[:5], extra[:5])
    assert all(ours[k] == fixture[k] for k in ours)
    if family != "sdxl":
        assert set(ours) == set(fixture)  # SD1/SD2 fresh saves carry the 12 schedule buffers too


# --- bad input ----------------------------------------------------------------------------


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {"x": torch.ones(1)}, "payload": Exploit()}, path)
    with pytest.raises(UserError, match=r"evil\.ckpt: refused to load"):
        load_models(path)
    assert not marker.exists()


def test_truncated_checkpoint(tiny_checkpoint, tmp_path):
    data = open(tiny_checkpoint("sd1"), "rb").read()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cut\.safetensors: file is truncated"):
        load_models(str(path))


def test_truncated_ckpt(tmp_path):
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.ones(1000)}}, str(full))
    data = full.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cut\.ckpt: cannot read"):
        load_models(str(cut))


@pytest.mark.parametrize("content", [b"", b"hello, this is a text file\n" * 10])
def test_non_model_file(content, tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"notes\.safetensors"):
        load_models(str(path))


@pytest.mark.parametrize("name, words", [
    ("lora_sd15_lierla_dim4.safetensors", "LoRA file.*--network_weights"),
    ("ti_sd15_2vec.safetensors", "textual-inversion embedding.*--textual_inversion_embeddings"),
])
def test_lora_or_embedding_passed_as_checkpoint(name, words, fixtures_dir):
    path = os.path.join(fixtures_dir, "sd-scripts", name)
    with pytest.raises(UserError, match=name.replace(".", r"\.") + ": " + "this is a " + words):
        load_models(path)


def test_family_flags_checked_against_the_file(tiny_checkpoint):
    with pytest.raises(UserError, match="--v2 was given"):
        load_models(tiny_checkpoint("sd1"), v2=True)
    with pytest.raises(UserError, match="needs SDXL"):
        load_models(tiny_checkpoint("sd1"), sdxl=True)
    with pytest.raises(UserError, match="is an SDXL model"):
        load_models(tiny_checkpoint("sdxl"), sdxl=False)
    assert load_models(tiny_checkpoint("sd2")).family.name == "sd2"  # no --v2 needed


def test_missing_path_says_nothing_is_downloaded(tmp_path):
    with pytest.raises(UserError, match="never downloaded"):
        load_models("runwayml/stable-diffusion-v1-5")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_models_have_the_full_size_key_structure(family):
    """Same keys as the real model (only widths differ), so tiny-model tests cover real layouts."""
    full = original_state_dict(full_size_meta_models(FAMILIES[family]))
    tiny = original_state_dict(build_random_models(FAMILIES[family], "tiny", seed=0))
    assert set(full) == set(tiny)
    assert all(full[k].ndim == tiny[k].ndim for k in full)


@pytest.mark.parametrize("fixture, family, kind", [
    ("checkpoint_sd15_fp16", "sd1", None), ("checkpoint_sdxl_base_fp16", "sdxl", None),
    ("lora_sd15_lierla_dim4", "sd1", "lora"), ("lora_sdxl_unet_only_dim4", "sdxl", "lora"),
    ("ti_sd15_2vec", "sd1", "textual-inversion"), ("ti_sdxl_2vec", "sdxl", "textual-inversion"),
])
def test_modelspec_values_match_what_sd_scripts_writes(fixture, family, kind, fixtures_dir):
    from library.models import modelspec

    theirs = json.load(open(os.path.join(fixtures_dir, "sd-scripts", fixture + ".keys.json")))["metadata"]
    ours = modelspec.build_metadata(FAMILIES[family], False, "t", kind=kind)
    for key in ("modelspec.architecture", "modelspec.implementation", "modelspec.sai_model_spec",
                "modelspec.prediction_type"):
        assert ours[key] == theirs[key], key
