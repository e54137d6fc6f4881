"""--fp8_base / --fp8_base_unet: frozen Linear/Conv2d weights held in float8_e4m3fn (scaled by a power of
two per tensor) compute exactly as float32 layers on the fp8-rounded weights, at half the memory of bf16.

The expected rounding is computed here from the e4m3fn format's definition (every finite value
enumerated, nearest one taken in float64), not with torch's cast."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from library.errors import UserError
from library.models import safetensors_io


def _e4m3fn_values():
    """Every finite float8_e4m3fn value, sorted, and whether its mantissa is even: bias 7, 3 mantissa
    bits, subnormals at exponent 0, no inf, and S.1111.111 is NaN (so the largest is 1.75 * 2**8 = 448)."""
    values = {}
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue
            v = m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
            values[v] = values[-v] = m % 2 == 0
    grid = np.array(sorted(values))
    return grid, np.array([values[v] for v in grid])


GRID, EVEN = _e4m3fn_values()


def fp8_rounded(w: torch.Tensor) -> torch.Tensor:
    """The held weight, in float64: w scaled by the largest power of two that keeps |w| <= 448,
    rounded to the nearest e4m3fn value (ties to the even mantissa), scaled back."""
    x = w.detach().double().numpy()
    amax = np.abs(x).max()
    k = 0
    while amax * 2.0 ** (k + 1) <= 448:
        k += 1
    while amax * 2.0 ** k > 448:
        k -= 1
    scaled = x * 2.0 ** k
    i = np.clip(np.searchsorted(GRID, scaled), 1, len(GRID) - 1)
    above, below = np.abs(GRID[i] - scaled), np.abs(GRID[i - 1] - scaled)
    take_above = (above < below) | ((above == below) & EVEN[i])
    return torch.from_numpy(np.where(take_above, GRID[i], GRID[i - 1]) * 2.0 ** -k)


def test_grid_is_the_format():
    assert len(GRID) == 253 and GRID.max() == 448 and np.sort(np.abs(GRID))[2] == 2.0 ** -9


@pytest.mark.parametrize("scale", [1e-3, 0.05, 3.0, 5000.0])
def test_quantize_rounds_to_nearest_with_a_power_of_two_scale(scale):
    """Small weights keep 3 mantissa bits (no flush to the subnormal grid), large ones never saturate."""
    from library.models.fp8_weights import FP8, quantize

    torch.manual_seed(1)
    w = (torch.randn(64, 48) * scale).half().float()
    q, k = quantize(w)
    assert q.dtype == FP8 and 224 < float(w.abs().max()) * 2.0 ** k <= 448
    held = q.double() * 2.0 ** -k
    assert torch.equal(held, fp8_rounded(w))
    assert torch.isfinite(held).all()
    big = w.abs() > w.abs().max() / 2 ** 10  # within the normal range after scaling: 4 significant bits
    assert ((held - w.double()).abs()[big] <= w.double().abs()[big] / 16).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_upcast_gives_every_code_its_value(dtype):
    """The table lookups (two codes at a time where aligned, one at a time otherwise) equal PyTorch's
    own cast for all 256 codes, at even and odd lengths and at offsets that rule out the pairs."""
    from library.models.fp8_weights import FP8, upcast_cpu_into

    torch.manual_seed(2)
    codes = torch.randint(0, 256, (4099,), dtype=torch.int32).to(torch.uint8)
    codes[:256] = torch.arange(256, dtype=torch.int32).to(torch.uint8)  # every code, NaN's included
    weight = codes.view(FP8)
    for exponent in (0, 5, -3):
        expected = (weight.float() * 2.0 ** -exponent).to(dtype)
        for start, stop in ((0, 4099), (0, 4098), (1, 4099), (0, 1), (2, 3)):
            for out_offset in (0, 1):  # one element in: output pairs misaligned
                out = torch.empty(stop - start + out_offset, dtype=dtype)[out_offset:]
                upcast_cpu_into(out, weight[start:stop], exponent)
                want = expected[start:stop]
                assert torch.equal(out.isnan(), want.isnan())
                assert torch.equal(out[~out.isnan()], want[~want.isnan()])


def test_a_non_finite_weight_is_refused_by_name():
    from library.models.frozen_weights import hold_in_fp8

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).requires_grad_(False)
    model[1].weight.data[2, 3] = float("inf")
    with pytest.raises(UserError, match=r"^1\.weight: .*inf or NaN"):
        hold_in_fp8(model)


def _reference(model: torch.nn.Sequential, x: torch.Tensor):
    """The model's function in float64 with its Linear/Conv2d weights fp8-rounded (torch.nn.functional only)."""
    for layer in model:
        if isinstance(layer, torch.nn.Conv2d):
            x = F.conv2d(x, fp8_rounded(layer.weight), layer.bias.double(), layer.stride, layer.padding)
        elif isinstance(layer, torch.nn.Linear):
            x = F.linear(x, fp8_rounded(layer.weight), layer.bias.double())
        elif isinstance(layer, torch.nn.GroupNorm):
            x = F.group_norm(x, layer.num_groups, layer.weight.double(), layer.bias.double(), layer.eps)
        else:
            x = layer(x)
    return x


def _model(side=16):
    torch.manual_seed(0)
    # 3x3 on a 16x16 map (oneDNN), 1x1 stride 2 on 16x16 (float32: im2col/GEMM), a Linear on few rows;
    # on an 8x8 map, bf16 convolutions unfold into one GEMM
    return torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
                               torch.nn.Conv2d(8, 8, 1, stride=2), torch.nn.Flatten(),
                               torch.nn.Linear(8 * (side // 2) ** 2, 5)).half().requires_grad_(False)


@pytest.mark.parametrize("layout", ["input_left", "weight_left"])
def test_fp8_layers_equal_float32_math_on_the_rounded_weights(layout, monkeypatch):
    from library.models import frozen_weights
    from library.models.fp8_weights import FP8
    from library.models.frozen_weights import hold_in_fp8

    monkeypatch.setattr(frozen_weights, "_THIN_LAYOUT", layout)
    monkeypatch.setattr(frozen_weights, "_BLOCK_ELEMENTS", 16 * 512)  # several weight-row blocks
    model = _model()
    held = copy.deepcopy(model)
    kept = hold_in_fp8(held)
    assert held[0].weight.dtype == FP8 and held[5].weight.dtype == FP8 and held[1].weight.dtype == torch.float32
    assert held[0].bias.dtype == torch.float32 and type(held[5]).__name__ == "Linear"  # adapters match by name
    assert kept == sum(held[i].weight.numel() for i in (0, 3, 5))
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    ref_x = x.clone().requires_grad_(True)
    ours_x = x.float().requires_grad_(True)
    ref, ours = _reference(model, ref_x), held(ours_x)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    ref.square().sum().backward()
    ours.square().sum().backward()
    torch.testing.assert_close(ours_x.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("side", [16, 8])
def test_fp8_layers_compute_in_bf16_under_autocast(side):
    from library.models import frozen_weights
    from library.models.frozen_weights import compute_dtype, hold_in_fp8

    model = _model(side)
    held = copy.deepcopy(model)
    hold_in_fp8(held, torch.bfloat16)
    assert compute_dtype(held) == torch.bfloat16
    x = torch.randn(2, 4, side, side, dtype=torch.float64)
    assert frozen_weights._unfold_cpu(x.shape, held[0].weight, 1, torch.bfloat16) == (side == 8)
    ref_x, ours_x = x.clone().requires_grad_(True), x.float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = held(ours_x)
    ref = _reference(model, ref_x)
    assert ours.dtype == torch.bfloat16
    assert float((ours.double() - ref).detach().norm() / ref.detach().norm()) < 0.02  # bf16 activations: 8-bit mantissa
    ref.square().sum().backward()
    ours.float().square().sum().backward()
    assert float((ours_x.grad.double() - ref_x.grad).norm() / ref_x.grad.norm()) < 0.03


def _diffusers_unet():
    """A small U-Net built directly with diffusers (its own init), not with our model builders."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()


def test_a_diffusers_unet_held_in_fp8_computes_as_float32_on_rounded_weights():
    """The output and input gradient of a diffusers U-Net held in fp8 equal the same U-Net's in float32
    whose Linear/Conv2d weights were set to their fp8-rounded values; its Linear/Conv2d weights take
    half the bytes they take in bf16, and every other tensor the same."""
    from library.models.fp8_weights import FP8
    from library.models.frozen_weights import hold_in_fp8, hold_in_half

    unet = _diffusers_unet().requires_grad_(False)
    reference = copy.deepcopy(unet)
    for layer in reference.modules():
        if type(layer) in (torch.nn.Linear, torch.nn.Conv2d):
            layer.weight.data = fp8_rounded(layer.weight).float()
    held = copy.deepcopy(unet)
    hold_in_fp8(held)
    assert held.dtype == torch.float32  # pipelines cast their inputs to it
    sample = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 7, 32)
    outputs, grads = [], []
    for model in (reference, held):
        c = context.clone().requires_grad_(True)
        out = model(sample, torch.tensor([500]), c).sample
        out.square().sum().backward()
        outputs.append(out)
        grads.append(c.grad)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)

    bf16 = copy.deepcopy(unet).to(torch.bfloat16)
    hold_in_half(bf16, torch.bfloat16)
    fp8 = copy.deepcopy(unet).to(torch.bfloat16)
    hold_in_fp8(fp8, torch.bfloat16)

    def sizes(model):
        weights = sum(m.weight.untyped_storage().nbytes() for m in model.modules()
                      if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
        every = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()])
        return weights, every - weights

    (w_bf16, rest_bf16), (w_fp8, rest_fp8) = sizes(bf16), sizes(fp8)
    assert all(m.weight.dtype == FP8 for m in fp8.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    assert 2 * w_fp8 == w_bf16 and rest_fp8 == rest_bf16


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_full_size_u_net_memory_is_its_linear_and_conv_weights(family):
    """On the full-size layouts (meta device) Linear/Conv2d weights are over 99.5 % of the U-Net's
    values, so holding them in fp8 halves the U-Net's memory against bf16 (to within 0.25 %)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from library.models import unet_convert
    from library.models.families import get_family

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_convert.unet_config(get_family(family), "full"))
    weights = sum(m.weight.numel() for m in unet.modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d))
    assert weights > 0.995 * sum(p.numel() for p in unet.parameters())


# ---------------------------------------------------------------------------------------------
# training runs


@pytest.fixture(scope="module")
def fp16_model(tmp_path_factory):
    from library.models.families import get_family
    from library.models.random_models import build_random_models
    from library.models.saving import save_models

    root = tmp_path_factory.mktemp("fp8_models")
    paths = {}
    for name in ("sd1", "sdxl"):
        paths[name] = str(root / f"{name}.safetensors")
        save_models(build_random_models(get_family(name), "tiny", 3), paths[name], precision=torch.float16)
    return paths


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, write_photos):
    root = tmp_path_factory.mktemp("fp8_data")
    write_photos(str(root / "2_subject"), ["astronaut", "chelsea", "coffee", "rocket"], lambda i: (64, 64),
                 lambda name: f"a photo of sks {name}")
    return str(root)


def _argv(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--resolution", "64", "--train_batch_size", "2", "--caption_extension", ".txt", "--seed", "3",
            "--max_data_loader_n_workers", "0", "--max_train_steps", "4", "--output_name", "lora",
            "--network_dim", "4", "--optimizer_type", "SGDNesterov", "--learning_rate", "0.5", *extra]


def _train(argv, sdxl=False, monkeypatch=None):
    """Train a network; the loss of every step (as the loop logs it) comes back with the run."""
    from library.training import train_logging
    from library.training.script_parsers import network_parser
    from library.training.task_network import NetworkTask
    from library.training.train_args import parse_args
    from library.training.trainer import train

    losses = []
    logged = train_logging.TrainLogger.step

    def step(self, step, epoch, loss, extra):
        losses.append(loss)
        return logged(self, step, epoch, loss, extra)

    monkeypatch.setattr(train_logging.TrainLogger, "step", step)
    run = train(parse_args(network_parser(sdxl=sdxl, description=""), argv), NetworkTask(sdxl=sdxl))
    monkeypatch.setattr(train_logging.TrainLogger, "step", logged)
    return run, losses


def _held_dtypes(module):
    return {m.weight.dtype for m in module.modules() if type(m).__name__ in ("Linear", "Conv2d")}


def test_a_lora_trained_with_fp8_base_equals_float32_training_on_rounded_weights(fp16_model, photo_dir, tmp_path,
                                                                               monkeypatch):
    """A --fp8_base run on an fp16 file trains the LoRA that a float32 run trains on a file whose U-Net and
    text-encoder Linear/Conv2d weights were rounded to fp8 here (same seed: same batches, noise and
    timesteps); its loss falls, and the file is float32 with the metadata."""
    from library.models.fp8_weights import FP8
    from library.models.frozen_weights import compute_dtype
    from library.models.loading import load_models
    from library.models.saving import save_models

    model = fp16_model["sd1"]
    rounded = str(tmp_path / "rounded.safetensors")
    models = load_models(model, dtype=torch.float32)
    for part in [models.unet, *models.text_encoders]:
        for layer in part.modules():
            if type(layer) in (torch.nn.Linear, torch.nn.Conv2d):
                layer.weight.data = fp8_rounded(layer.weight).float()
    save_models(models, rounded, precision=torch.float32)

    flags = ("--gradient_checkpointing", "--cache_latents")
    _, base = _train(_argv(rounded, photo_dir, str(tmp_path / "rounded"), *flags), monkeypatch=monkeypatch)
    run, losses = _train(_argv(model, photo_dir, str(tmp_path / "fp8"), "--fp8_base", *flags), monkeypatch=monkeypatch)
    assert _held_dtypes(run.models.unet) == {FP8} and _held_dtypes(run.models.text_encoders[0]) == {FP8}
    assert run.models.text_encoders[0].get_input_embeddings().weight.dtype == torch.float16  # not fp8
    assert compute_dtype(run.models.unet) == torch.float32 and run.models.unet.dtype == torch.float32
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert max(abs(a - b) for a, b in zip(losses, base)) < 1e-5
    path = str(tmp_path / "fp8" / "lora.safetensors")
    a = safetensors_io.load_tensors(path)
    b = safetensors_io.load_tensors(str(tmp_path / "rounded" / "lora.safetensors"))
    assert a.keys() == b.keys() and {t.dtype for t in a.values()} == {torch.float32}
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_up" in k) > 0  # up factors start at 0
    metadata = safetensors_io.read_metadata(path)
    assert metadata["ss_fp8_base"] == "True" and metadata["ss_fp8_base_unet"] == "False"
    assert safetensors_io.read_metadata(str(tmp_path / "rounded" / "lora.safetensors"))["ss_fp8_base"] == "False"


def test_fp8_base_unet_with_bf16_and_cached_text_encoder_outputs(fp16_model, photo_dir, tmp_path, monkeypatch):
    """--fp8_base_unet holds the U-Net alone in fp8; with --mixed_precision bf16 it computes in bf16."""
    from library.models import device_setup
    from library.models.fp8_weights import FP8
    from library.models.frozen_weights import compute_dtype

    monkeypatch.setattr(device_setup, "cpu_has_fast_bf16", lambda: True)
    out = tmp_path / "out"
    run, losses = _train(_argv(fp16_model["sdxl"], photo_dir, str(out), "--fp8_base", "--fp8_base_unet",
                               "--mixed_precision", "bf16", "--network_train_unet_only", "--cache_text_encoder_outputs",
                               "--max_train_steps", "2"), sdxl=True, monkeypatch=monkeypatch)
    assert _held_dtypes(run.models.unet) == {FP8} and compute_dtype(run.models.unet) == torch.bfloat16
    assert all(FP8 not in _held_dtypes(te) for te in run.models.text_encoders)
    assert all(math.isfinite(x) for x in losses)
    metadata = safetensors_io.read_metadata(str(out / "lora.safetensors"))
    assert metadata["ss_fp8_base"] == "True" and metadata["ss_fp8_base_unet"] == "True"
    assert {t.dtype for t in safetensors_io.load_tensors(str(out / "lora.safetensors")).values()} == {torch.float32}


def test_lycoris_with_fp8_base_runs_in_bypass_mode(fp16_model, photo_dir, tmp_path, monkeypatch):
    """LyCORIS wraps the same held layers and, in bypass mode, only calls them: it trains a file with
    the keys of the run without fp8."""
    pytest.importorskip("lycoris")
    from library.models.fp8_weights import FP8

    module = ["--network_module", "lycoris.kohya", "--network_args", "algo=locon", "conv_dim=4"]
    run, losses = _train(_argv(fp16_model["sd1"], photo_dir, str(tmp_path / "fp8"), *module, "--fp8_base",
                               "--max_train_steps", "2"), monkeypatch=monkeypatch)
    assert _held_dtypes(run.models.unet) == {FP8}
    lycoris_modules = [m for m in run.extra["task"].network.modules() if hasattr(m, "bypass_mode")]
    assert lycoris_modules and all(m.bypass_mode for m in lycoris_modules)
    assert all(math.isfinite(x) for x in losses)
    _train(_argv(fp16_model["sd1"], photo_dir, str(tmp_path / "plain"), *module, "--max_train_steps", "2"),
           monkeypatch=monkeypatch)
    a = safetensors_io.load_tensors(str(tmp_path / "fp8" / "lora.safetensors"))
    b = safetensors_io.load_tensors(str(tmp_path / "plain" / "lora.safetensors"))
    assert a.keys() == b.keys() and len(a) > 10
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_up" in k)


@pytest.mark.parametrize("script,argv,expected", [
    ("train_db", [], r"^--fp8_base: train_db\.py trains the U-Net's own weights"),
    ("network", ["--network_module", "lycoris.kohya", "--network_args", "dora_wd=True"], r"^--fp8_base: LyCORIS dora_wd"),
    ("network", ["--network_module", "lycoris.kohya", "--network_args", "bypass_mode=False"],
     r"^--fp8_base: LyCORIS needs bypass_mode=True"),
    ("network", ["--network_module", "mypackage.mynet"], r"^--fp8_base: --network_module mypackage\.mynet may compute"),
])
def test_fp8_base_is_refused_in_one_line_where_it_cannot_apply(script, argv, expected, tmp_path):
    """Before any data is scanned or model loaded (the model path here does not exist)."""
    from library.training.script_parsers import network_parser
    from library.training.task_network import NetworkTask
    from library.training.train_args import parse_args
    from library.training.trainer import prepare_run

    common = ["--pretrained_model_name_or_path", str(tmp_path / "none.safetensors"), "--train_data_dir",
              str(tmp_path / "none"), "--output_dir", str(tmp_path / "out"), "--fp8_base", *argv]
    if script == "train_db":
        from library.training.script_parsers import db_parser
        from library.training.task_full import FullModelTask

        args, task = parse_args(db_parser(description=""), common), FullModelTask("db")
    else:
        args, task = parse_args(network_parser(sdxl=False, description=""), common), NetworkTask(sdxl=False)
    with pytest.raises(UserError, match=expected) as refused:
        prepare_run(args, task)
    assert "\n" not in str(refused.value)


def test_textual_inversion_holds_the_frozen_u_net_in_fp8(fp16_model, photo_dir, tmp_path):
    from library.models.fp8_weights import FP8
    from library.training.task_embedding import EmbeddingTask
    from library.training.script_parsers import ti_parser
    from library.training.train_args import parse_args
    from library.training.trainer import train

    argv = _argv(fp16_model["sd1"], photo_dir, str(tmp_path), "--token_string", "sks", "--init_word", "photo",
                 "--max_train_steps", "2", "--save_model_as", "safetensors", "--fp8_base")
    argv = argv[:argv.index("--network_dim")] + argv[argv.index("--network_dim") + 2:]
    run = train(parse_args(ti_parser(sdxl=False, description=""), argv), EmbeddingTask(sdxl=False))
    assert _held_dtypes(run.models.unet) == {FP8} and FP8 in _held_dtypes(run.models.text_encoders[0])
    vectors = safetensors_io.load_tensors(str(tmp_path / "lora.safetensors"))  # --output_name lora
    assert all(torch.isfinite(v).all() for v in vectors.values())


def test_base_weights_are_merged_before_the_weights_are_held_in_fp8(fp16_model, photo_dir, tmp_path, monkeypatch):
    """--base_weights with --fp8_base: the U-Net holds the fp8 rounding of the merged weights (those
    a float32 run without fp8 computes with), not of the file's."""
    import networks.lora
    from library.models.loading import load_models

    model = fp16_model["sd1"]
    original = load_models(model, dtype=torch.float32)
    torch.manual_seed(5)
    network = networks.lora.create_network(1.0, 4, 4, original.vae, original.text_encoders[0], original.unet)
    for name, p in network.named_parameters():
        if "lora_up" in name:
            p.data.normal_(0, 0.5)
    base = str(tmp_path / "base.safetensors")
    network.save_weights(base, torch.float32, {})
    flags = ("--base_weights", base, "--max_train_steps", "1")
    run, _ = _train(_argv(model, photo_dir, str(tmp_path / "fp8"), "--fp8_base", *flags), monkeypatch=monkeypatch)
    plain, _ = _train(_argv(model, photo_dir, str(tmp_path / "plain"), *flags), monkeypatch=monkeypatch)
    merged = dict(plain.models.unet.named_modules())
    untouched = dict(original.unet.named_modules())
    checked = changed = 0
    for name, layer in run.models.unet.named_modules():
        if type(layer).__name__ not in ("Linear", "Conv2d") or not hasattr(layer, "fp8_exponent"):
            continue
        held = layer.weight.double() * 2.0 ** -layer.fp8_exponent
        # the fp8 run merges into the file's fp16 weights (the float32 run into float32 copies of them,
        # with the same float32 delta): the merged value is rounded to fp16, then to fp8
        assert torch.equal(held, fp8_rounded(merged[name].weight.half())), name
        checked += 1
        changed += not torch.equal(held, fp8_rounded(untouched[name].weight))
    assert checked > 20 and changed > 10
