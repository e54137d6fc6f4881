"""Frozen weights held in the checkpoint's half precision compute exactly like float32 ones."""

import copy
import os

import pytest
import torch

from library.models import safetensors_io

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]


@pytest.fixture(scope="module")
def half_and_full(tmp_path_factory):
    """The same tiny weights twice: stored in fp16, and stored as the float32 values of those fp16s."""
    from library.models.families import get_family
    from library.models.loading import load_models
    from library.models.saving import save_models
    from library.models.random_models import build_random_models

    root = tmp_path_factory.mktemp("half_models")
    paths = {}
    for name in ("sd1", "sdxl"):
        half = str(root / f"{name}-fp16.safetensors")
        save_models(build_random_models(get_family(name), "tiny", 3), half, precision=torch.float16)
        full = str(root / f"{name}-fp32.safetensors")
        save_models(load_models(half, dtype=torch.float32), full, precision=torch.float32)
        paths[name] = (half, full)
    return paths


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, write_photos):
    root = tmp_path_factory.mktemp("half_data")
    write_photos(str(root / "2_subject"), PHOTOS, lambda i: (64 + 64 * (i % 2), 64),
                 lambda name: f"a photo of sks {name}")
    return str(root)


def common(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128",
            "--bucket_reso_steps", "64", "--train_batch_size", "2", "--caption_extension", ".txt", "--seed", "3",
            "--max_data_loader_n_workers", "0", "--max_train_steps", "3", "--learning_rate", "1e-2", *extra]


def train_lora(argv, sdxl=False, module=("networks.lora",)):
    from library.training.script_parsers import network_parser
    from library.training.task_network import NetworkTask
    from library.training.train_args import parse_args
    from library.training.trainer import train

    # SGD: its steps are proportional to the gradients, so float rounding differences in them stay
    # rounding-sized (Adam's first steps turn near-zero gradients into full-size ones)
    argv = [*argv, "--network_module", *module, "--network_dim", "4", "--output_name", "lora",
            "--optimizer_type", "SGDNesterov", "--learning_rate", "0.5"]
    return train(parse_args(network_parser(sdxl=sdxl, description=""), argv), NetworkTask(sdxl=sdxl))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_upcasting_layers_equal_float32_layers():
    from library.models.frozen_weights import hold_in_half

    torch.manual_seed(0)
    full = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
                               torch.nn.Conv2d(8, 8, 1, stride=2), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5))
    half = copy.deepcopy(full).half().requires_grad_(False)
    full = copy.deepcopy(half).float().requires_grad_(False)  # the float32 values of the fp16 weights
    kept = hold_in_half(half)
    assert kept == sum(m.weight.numel() * 2 for m in half if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert half[0].weight.dtype == torch.float16 and half[1].weight.dtype == torch.float32
    assert type(half[0]).__name__ == "Conv2d" and type(half[5]).__name__ == "Linear"  # adapters match by name
    assert half[0].bias.dtype == torch.float32
    x1 = torch.randn(2, 4, 8, 8, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = full(x1), half(x2)
    assert torch.allclose(y1, y2, atol=1e-6, rtol=0)
    y1.square().sum().backward()
    y2.square().sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["input_left", "weight_left"])
@pytest.mark.parametrize("rows", [1, 77, 300])
def test_frozen_linear_by_weight_row_blocks_matches_torch(rows, layout, monkeypatch):
    """Few rows take the weight-row-block path (several blocks here) in either layout; many rows take
    F.linear. Either way the output and input gradient are torch's. Where blocks also serve float32
    weights (weight_left), fp16-held and float32 weights agree exactly; on input_left a float32
    weight has nothing to upcast and multiplies as it is."""
    from library.models import frozen_weights
    from library.models.frozen_weights import hold_in_half

    monkeypatch.setattr(frozen_weights, "_BLOCK_ELEMENTS", 16 * 24)  # 16-row blocks of a 24-wide weight
    monkeypatch.setattr(frozen_weights, "_THIN_LAYOUT", layout)
    torch.manual_seed(0)
    half = torch.nn.Linear(24, 70).half().requires_grad_(False)
    full = copy.deepcopy(half).float()
    held, swapped = copy.deepcopy(half), copy.deepcopy(full)
    hold_in_half(held)
    hold_in_half(swapped)
    assert type(swapped) is frozen_weights.Linear and swapped.weight.dtype == torch.float32
    blocked = frozen_weights._thin_cpu(rows, swapped.weight, torch.float32)
    assert blocked == (rows <= frozen_weights._THIN_ROWS and layout == "weight_left")
    assert frozen_weights._thin_cpu(rows, held.weight, torch.float32) == (rows <= frozen_weights._THIN_ROWS)
    calls = []
    block_mm = frozen_weights._thin_linear
    monkeypatch.setattr(frozen_weights, "_thin_linear", lambda *a: calls.append(1) or block_mm(*a))
    x = torch.randn(rows, 24)
    inputs = [x.clone().requires_grad_(True) for _ in range(3)]
    outputs = [layer(v) for layer, v in zip((full, held, swapped), inputs)]
    assert len(calls) == (rows <= frozen_weights._THIN_ROWS) + blocked
    grad = torch.randn_like(outputs[0])
    for out in outputs:
        out.backward(grad)
    for i in (1, 2):
        torch.testing.assert_close(outputs[i], outputs[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(inputs[i].grad, inputs[0].grad, rtol=1e-5, atol=1e-6)
    if layout == "weight_left":
        assert torch.equal(outputs[1], outputs[2]) and torch.equal(inputs[1].grad, inputs[2].grad)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lora_on_an_fp16_file_equals_float32_training(family, half_and_full, photo_dir, tmp_path):
    from library.models.frozen_weights import compute_dtype, is_held_in_half

    half, full = half_and_full[family]
    sdxl = family == "sdxl"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks --w 64 --h 64 --s 2 --d 5\n", encoding="utf-8")
    run = train_lora(common(half, photo_dir, str(tmp_path / "half"), "--sample_prompts", str(prompts),
                            "--sample_at_first"), sdxl)
    linear = run.models.unet.down_blocks[0].resnets[0].conv1
    assert linear.weight.dtype == torch.float16  # held in the file's precision...
    tokens = run.models.text_encoders[0].get_input_embeddings()
    assert tokens.weight.dtype == torch.float16  # the token table too: only looked-up rows are upcast
    assert tokens(torch.tensor([[1, 2]])).dtype == torch.float32
    # pipelines cast their inputs to `model.dtype`: held models report the dtype they compute in
    parts = [run.models.unet, run.models.vae, *run.models.text_encoders]
    assert all(part.dtype == torch.float32 for part in parts)
    assert type(run.models.unet).__name__ == "UNet2DConditionModel"
    assert is_held_in_half(run.models.vae)  # it encodes every step and decodes the sample image
    assert compute_dtype(run.models.vae) == torch.float32
    train_lora(common(full, photo_dir, str(tmp_path / "full")), sdxl)
    a = safetensors_io.load_tensors(str(tmp_path / "half" / "lora.safetensors"))
    b = safetensors_io.load_tensors(str(tmp_path / "full" / "lora.safetensors"))
    assert max_diff(a, b) <= 1e-5  # ...yet trained as with float32 weights
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_up" in k) > 0
    assert len([f for f in os.listdir(tmp_path / "half" / "sample") if f.endswith(".png")]) == 1


@pytest.mark.parametrize("module", [("networks.dylora", "--network_args", "unit=2"), ("networks.lora_fa",),
                                    ("lycoris.kohya", "--network_args", "algo=lokr")], ids=lambda m: m[0])
def test_other_network_modules_on_an_fp16_file(module, half_and_full, photo_dir, tmp_path):
    """Our adapters find the held layers by class name and call their forward: same result as float32.
    Plugins may compute with the base weight tensor itself (LyCORIS does), so they get float32 ones."""
    from library.models.frozen_weights import is_held_in_half

    if module[0] == "lycoris.kohya":
        pytest.importorskip("lycoris")
    half, full = half_and_full["sd1"]
    run = train_lora(common(half, photo_dir, str(tmp_path / "half"), "--max_train_steps", "2"), module=module)
    assert is_held_in_half(run.models.unet) == module[0].startswith("networks.")
    train_lora(common(full, photo_dir, str(tmp_path / "full"), "--max_train_steps", "2"), module=module)
    a = safetensors_io.load_tensors(str(tmp_path / "half" / "lora.safetensors"))
    b = safetensors_io.load_tensors(str(tmp_path / "full" / "lora.safetensors"))
    assert len(a) > 10 and max_diff(a, b) <= 1e-5


def test_embedding_on_an_fp16_file_equals_float32_training(half_and_full, photo_dir, tmp_path):
    from library.training.task_embedding import EmbeddingTask
    from library.training.train_args import parse_args
    from library.training.script_parsers import ti_parser
    from library.training.trainer import train

    half, full = half_and_full["sd1"]
    extra = ["--token_string", "sks", "--init_word", "photo", "--num_vectors_per_token", "2"]
    for model, out in ((half, "half"), (full, "full")):
        argv = common(model, photo_dir, str(tmp_path / out), *extra, "--save_model_as", "safetensors")
        train(parse_args(ti_parser(sdxl=False, description=""), argv), EmbeddingTask(sdxl=False))
    a = safetensors_io.load_tensors(str(tmp_path / "half" / "sks.safetensors"))
    b = safetensors_io.load_tensors(str(tmp_path / "full" / "sks.safetensors"))
    assert max_diff(a, b) <= 1e-6


def test_bf16_on_cpu_holds_the_frozen_u_net_and_text_encoders_in_bf16(half_and_full, photo_dir, tmp_path, monkeypatch):
    """--mixed_precision bf16 on a CPU with bf16 kernels: the frozen U-Net and text encoders are read in
    bf16 (as sd-scripts holds them) and computed in bf16 through the frozen layers' CPU paths; the VAE
    is left plain. The LoRA it trains is the float32 run's to bf16 accuracy."""
    from library.models import device_setup
    from library.models.frozen_weights import compute_dtype, is_held_in_half, uses_frozen_layers

    monkeypatch.setattr(device_setup, "cpu_has_fast_bf16", lambda: True)  # the tiny model is quick either way

    half, _ = half_and_full["sd1"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks --w 64 --h 64 --s 2 --d 5\n", encoding="utf-8")
    run = train_lora(common(half, photo_dir, str(tmp_path / "bf16"), "--mixed_precision", "bf16",
                            "--sample_prompts", str(prompts), "--sample_at_first"))
    assert len([f for f in os.listdir(tmp_path / "bf16" / "sample") if f.endswith(".png")]) == 1
    conv = run.models.unet.down_blocks[0].resnets[0].conv1
    assert type(conv).__module__ == "library.models.frozen_weights" and conv.weight.dtype == torch.bfloat16
    assert compute_dtype(run.models.unet) == torch.bfloat16 and run.models.unet.dtype == torch.bfloat16
    assert uses_frozen_layers(run.models.text_encoders[0]) and not uses_frozen_layers(run.models.vae)
    run = train_lora(common(half, photo_dir, str(tmp_path / "f32")))
    assert is_held_in_half(run.models.unet) and is_held_in_half(run.models.text_encoders[0])
    a = safetensors_io.load_tensors(str(tmp_path / "bf16" / "lora.safetensors"))
    b = safetensors_io.load_tensors(str(tmp_path / "f32" / "lora.safetensors"))
    ups = [k for k in a if "lora_up" in k]
    # up factors start at zero, so all of them was trained. bf16's 8-bit mantissa over a few steps
    # moves the whole set by a few per cent (relative norm: 5.6 % on an Intel CPU with AMX, where the
    # tiny text encoder's q/k factors, with the smallest gradients, differ most); a run that trained
    # something else, or nothing, is at 100 % or more
    error = sum(float((a[k].float() - b[k].float()).square().sum()) for k in ups) ** 0.5
    trained = sum(float(b[k].float().square().sum()) for k in ups) ** 0.5
    assert trained > 0 and error <= 0.15 * trained


@pytest.mark.parametrize("side,stride,batch,kernel", [(4, 1, 1, 3), (8, 2, 2, 3), (5, 1, 2, 1), (16, 1, 1, 3)])
def test_bf16_frozen_conv_under_autocast_matches_float32(side, stride, batch, kernel):
    """Maps up to 8x8 take unfold + one bf16 GEMM, larger ones oneDNN: either way, under autocast, the
    output and input gradient are the float32 convolution's of the same weights, to bf16 accuracy."""
    from library.models import frozen_weights
    from library.models.frozen_weights import hold_in_half

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(24, 40, kernel, stride=stride, padding=kernel // 2).bfloat16().requires_grad_(False)
    reference = copy.deepcopy(conv).float()  # the float32 values of the bf16 weights
    hold_in_half(conv, torch.bfloat16)
    x = torch.randn(batch, 24, side, side)
    assert frozen_weights._unfold_cpu(x.shape, conv.weight, 1, torch.bfloat16) == (side * side <= 64)
    held_in, ref_in = x.clone().requires_grad_(True), x.bfloat16().float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(held_in)
    out_ref = reference(ref_in)
    assert out.dtype == torch.bfloat16 and out.shape == out_ref.shape
    grad = torch.randn_like(out_ref).bfloat16().float()
    out.backward(grad.bfloat16())
    out_ref.backward(grad)
    torch.testing.assert_close(out.float(), out_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(held_in.grad, ref_in.grad, rtol=2e-2, atol=2e-2)


def test_bf16_frozen_linear_under_autocast_takes_float32_input_without_upcasting_its_weight(monkeypatch):
    from library.models import frozen_weights
    from library.models.frozen_weights import hold_in_half

    monkeypatch.setattr(frozen_weights, "_buffers", frozen_weights._UpcastBuffers())
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 70).bfloat16().requires_grad_(False)
    reference = copy.deepcopy(linear).float()
    hold_in_half(linear, torch.bfloat16)
    x = torch.randn(77, 24, requires_grad=True)  # float32, as an fp32 op's output under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert not frozen_weights._buffers.by_dtype  # no float32 copy of the weight was made
    ref_in = x.detach().bfloat16().float().requires_grad_(True)
    out_ref = reference(ref_in)
    out_ref.sum().backward()
    torch.testing.assert_close(out.float(), out_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad, ref_in.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("side", [4, 8, 16, 32])
def test_frozen_conv_on_any_map_size_matches_torch_and_leaves_onednn_as_it_was(side):
    """Small maps take im2col+GEMM, large ones oneDNN: both give the float32 convolution, forward and
    input gradient, and the process-wide oneDNN switch is back as it was after each op."""
    from library.models.frozen_weights import hold_in_half

    torch.manual_seed(0)
    reference = torch.nn.Conv2d(24, 16, 3, padding=1)
    frozen = copy.deepcopy(reference).requires_grad_(False)
    frozen.weight.data = frozen.weight.data.half()
    reference.weight.data = frozen.weight.data.float()
    reference.requires_grad_(False)
    assert hold_in_half(frozen) == frozen.weight.numel() * 2
    x = torch.randn(2, 24, side, side, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    enabled = torch._C._get_mkldnn_enabled()
    out, out_ref = frozen(x), reference(x_ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    assert torch._C._get_mkldnn_enabled() == enabled
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
