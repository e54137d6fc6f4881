"""LoRA file I/O: sshs hashes against a real sd-scripts file and the `safetensors` package, save/load
round trips, dtypes, the legacy/new model hashes and the ss_* helpers."""

import hashlib
import io
import os

import pytest
import torch

from library.training import lora_metadata
from library.errors import UserError
from library.models.families import FAMILIES
from library.models.safetensors_io import load_tensors, read_header, save_tensors
from networks import lora

REAL_FILE = ("sd-scripts", "lora_sd15_lierla_dim4.safetensors")


@pytest.fixture(scope="module")
def tiny_sd1():
    from library.models.random_models import build_random_models

    return build_random_models(FAMILIES["sd1"], "tiny", 0)


def _reference_hashes(tensors, metadata):
    """What sd-scripts does: serialise with the safetensors package, hash the bytes."""
    import safetensors.torch

    raw = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(raw[:8], "little")
    buffer = io.BytesIO(raw)
    buffer.seek(0x100000)
    legacy = hashlib.sha256(buffer.read(0x10000)).hexdigest()[:8]
    return hashlib.sha256(raw[8 + n:]).hexdigest(), legacy


def test_sshs_hashes_of_real_sd_scripts_file(fixtures_dir):
    path = os.path.join(fixtures_dir, *REAL_FILE)
    header = read_header(path)
    tensors = load_tensors(path)
    model_hash, legacy_hash = lora_metadata.sshs_hashes(tensors, header.metadata)
    assert model_hash == header.metadata["sshs_model_hash"]
    assert legacy_hash == header.metadata["sshs_legacy_hash"]
    # sd-scripts wrote the file in the order it hashed, so the indexers' hash of the file agrees.
    assert lora_metadata.safetensors_data_sha256(path) == model_hash


@pytest.mark.parametrize("size", [10, 300_000])
def test_sshs_hashes_equal_safetensors_serialisation(size):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.lora_up.weight": torch.randn(size, generator=g),
        "a.lora_down.weight": torch.randn(7, 3, generator=g).half(),
        "a.alpha": torch.tensor(4),
        "c.alpha": torch.tensor(2.0).to(torch.bfloat16),
        "d.mask": torch.tensor([True, False]),
        "e.weight": torch.randn(3, generator=g).double(),
    }
    metadata = {"ss_training_comment": "日本語 \"quoted\"\n\x01", "ss_tag_frequency": '{"a": 1}',
                "modelspec.title": "not hashed"}
    expected = _reference_hashes(tensors, metadata)
    assert lora_metadata.sshs_hashes(tensors, metadata) == expected
    changed = dict(metadata, **{"modelspec.title": "other"})
    assert lora_metadata.sshs_hashes(tensors, changed) == expected
    if size > 0x100000 // 4:  # the legacy window lies in the data: a longer ss_ header moves it
        longer = dict(metadata, ss_extra="x" * 100)
        assert lora_metadata.sshs_hashes(tensors, longer)[1] == _reference_hashes(tensors, longer)[1]
        assert lora_metadata.sshs_hashes(tensors, longer)[1] != expected[1]


def test_save_weights_safetensors(tiny_sd1, tmp_path):
    models = tiny_sd1
    network = lora.create_network(1.0, 4, 2, None, models.text_encoders[0], models.unet, conv_dim="2")
    path = str(tmp_path / "out.safetensors")
    network.save_weights(path, torch.float16, {"ss_network_dim": "4", "modelspec.title": "t"})
    header = read_header(path)
    assert {info.dtype for info in header.tensors.values()} == {"F16"}
    assert header.tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"].shape == ()
    meta = header.metadata
    assert meta["ss_network_dim"] == "4" and meta["modelspec.title"] == "t"
    assert meta["sshs_model_hash"] == lora_metadata.safetensors_data_sha256(path)
    tensors = load_tensors(path)
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == _reference_hashes(tensors, meta)
    assert set(tensors) == set(network.state_dict())


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_round_trip(ext, tiny_sd1, tmp_path):
    models = tiny_sd1
    te, unet = models.text_encoders[0], models.unet
    network = lora.create_network(1.0, 4, 3, None, te, unet, conv_dim="2", conv_alpha="0.5")
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn_like(p))
    path = str(tmp_path / f"lora{ext}")
    network.save_weights(path, None, None)
    again, weights = lora.create_network_from_weights(1.0, path, None, te, unet)
    info = again.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    original = network.state_dict()
    loaded = again.state_dict()
    assert set(loaded) == set(original)
    assert all(torch.equal(loaded[k], original[k]) for k in original)
    assert {m.scale for m in again.unet_loras if m.is_conv and m.kernel_size == (3, 3)} == {0.25}
    assert {float(v) for k, v in weights.items() if k.endswith(".alpha")} == {3.0, 0.5}


def test_loads_int64_alphas_of_real_file(fixtures_dir, tiny_sd1):
    path = os.path.join(fixtures_dir, *REAL_FILE)
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from library.models import clip_convert, unet_convert

    family = FAMILIES["sd1"]
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_convert.unet_config(family, "full"))
    spec = family.text_encoders[0]
    te = clip_convert.build_text_encoder(clip_convert.clip_config(spec, "full"), spec, device="meta")
    network = lora.create_network(1.0, 4, 8, None, te, unet)
    assert {m.scale for m in network.all_loras()} == {2.0}
    network.load_weights(path)
    file = load_tensors(path)
    state = network.state_dict()
    assert all(torch.equal(state[k], file[k].to(state[k].dtype)) for k in file)
    assert state["lora_unet_mid_block_attentions_0_proj_in.alpha"].dtype == torch.float32
    assert {m.scale for m in network.all_loras()} == {0.25}  # alpha 1 from the file now rules


def test_sd2_conv_projection_files_load_into_linear(tmp_path):
    """kohya's SD2 single-file U-Net has 1x1 conv projections: 4-D LoRA tensors for our Linear."""
    from diffusers import UNet2DConditionModel

    from library.models import unet_convert

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(unet_convert.unet_config(FAMILIES["sd2"], "tiny"))
    network = lora.create_network(1.0, 4, 1, None, None, unet)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn_like(p))
    sd = {k: (v[..., None, None] if "proj_" in k and v.dim() == 2 else v) for k, v in network.state_dict().items()}
    assert sd["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].dim() == 4
    path = str(tmp_path / "conv_proj.safetensors")
    save_tensors(sd, path)
    again, _ = lora.create_network_from_weights(1.0, path, None, None, unet)
    again.load_weights(path)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in network.state_dict().items())
    module = next(m for m in again.unet_loras if m.lora_name.endswith("mid_block_attentions_0_proj_in"))
    before = module.org_module.weight.detach().clone()
    again.merge_to(None, unet, sd)
    down, up = network.state_dict()[module.lora_name + ".lora_down.weight"], sd[module.lora_name + ".lora_up.weight"]
    assert torch.allclose(module.org_module.weight, before + 0.25 * up.flatten(1) @ down, atol=1e-5)


def test_legacy_and_full_file_hashes(tmp_path):
    data = bytes(range(256)) * (0x120000 // 256)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert lora_metadata.legacy_model_hash(str(path)) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert lora_metadata.file_sha256(str(path)) == hashlib.sha256(data).hexdigest()


def test_metadata_helpers():
    assert lora_metadata.base_model_version(FAMILIES["sd1"], False) == "sd_v1"
    assert lora_metadata.base_model_version(FAMILIES["sd2"], True) == "sd_v2_v"
    assert lora_metadata.base_model_version(FAMILIES["sdxl"], False) == "sdxl_base_v1-0"
    assert lora_metadata.stringify({"a": None, "b": (512, 512), "c": True}) == {"a": "None", "b": "(512, 512)", "c": "True"}
    meta = {"ss_v2": "False", "ss_network_dim": "4", "ss_seed": "1", "modelspec.title": "x"}
    assert lora_metadata.minimum_metadata(meta) == {"ss_v2": "False", "ss_network_dim": "4"}
    sd = {"a.lora_down.weight": torch.zeros(4, 3), "a.alpha": torch.tensor(1), "b.lora_down.weight": torch.zeros(8, 3),
          "b.alpha": torch.tensor(1.0)}
    assert lora_metadata.dims_and_alphas(sd) == ("Dynamic", "1")
    assert lora_metadata.network_args_metadata(["conv_dim=4", "unit = 2"]) == '{"conv_dim": "4", "unit": "2"}'


def test_bad_files(tmp_path, tiny_sd1):
    with pytest.raises(UserError, match="not found"):
        lora.read_lora_file(str(tmp_path / "missing.safetensors"))
    path = str(tmp_path / "loha.safetensors")
    save_tensors({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, path)
    with pytest.raises(UserError, match="no LoRA tensors"):
        lora.create_network_from_weights(1.0, path, None, tiny_sd1.text_encoders[0], tiny_sd1.unet)
