"""Precision requests that a device cannot serve fast degrade to float32 with one warning."""

import logging
import types

import pytest
import torch

from library.models import device_setup
from library.models.device_setup import resolve_precision

CPU = torch.device("cpu")


def precision_args(mixed_precision, **flags):
    return types.SimpleNamespace(**{"mixed_precision": mixed_precision, "full_fp16": False, "full_bf16": False,
                                    "fp8_base": False, **flags})


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, write_photos):
    root = tmp_path_factory.mktemp("precision_data")
    write_photos(str(root / "2_subject"), ["astronaut", "coffee"], lambda i: (64, 64), lambda name: f"a photo of {name}")
    return str(root)


@pytest.fixture
def slow_bf16(monkeypatch):
    """A CPU without bf16 kernels (AVX2 only), where bf16 convolutions run about 150x slower."""
    monkeypatch.setattr(device_setup, "cpu_has_fast_bf16", lambda: False)


@pytest.fixture
def fast_bf16(monkeypatch):
    monkeypatch.setattr(device_setup, "cpu_has_fast_bf16", lambda: True)


def test_bf16_on_a_cpu_without_bf16_kernels_trains_in_float32_with_one_warning(slow_bf16, caplog):
    args = precision_args("bf16", full_bf16=True)
    with caplog.at_level(logging.WARNING):
        precision = resolve_precision(args, CPU)
    assert precision == device_setup.Precision(torch.float32, None, torch.float32, "no")
    assert args.full_bf16 is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "--mixed_precision bf16" in warnings[0] and "float32" in warnings[0]


def test_bf16_where_the_cpu_has_bf16_kernels_is_kept(fast_bf16, caplog):
    with caplog.at_level(logging.WARNING):
        precision = resolve_precision(precision_args("bf16"), CPU)
    assert (precision.weight_dtype, precision.autocast_dtype, precision.mixed_precision) == (
        torch.bfloat16, torch.bfloat16, "bf16")
    assert precision.train_dtype == torch.float32 and not caplog.records
    full = resolve_precision(precision_args("bf16", full_bf16=True), CPU)
    assert full.train_dtype == torch.bfloat16


def test_bf16_on_cuda_is_never_second_guessed(slow_bf16):
    assert device_setup.bf16_or_float32(torch.device("cuda"), "--mixed_precision bf16", "training") == torch.bfloat16


def test_fp16_off_cuda_trains_in_float32_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING):
        precision = resolve_precision(precision_args("fp16", full_fp16=True), CPU)
    assert precision.mixed_precision == "no" and precision.weight_dtype == torch.float32
    assert "--mixed_precision fp16 needs CUDA" in caplog.text


def test_generation_bf16_follows_the_cpu(slow_bf16, caplog):
    from library.generation.loading import resolve_dtype

    args = types.SimpleNamespace(fp16=False, full_fp16=False, bf16=True, full_bf16=False)
    with caplog.at_level(logging.WARNING):
        assert resolve_dtype(args, CPU) == torch.float32
    assert "--bf16" in caplog.text and "generating in float32" in caplog.text


def test_cache_tools_resolve_bf16_as_the_training_run_does(slow_bf16, monkeypatch):
    """The tools encode with the VAE dtype the run will use, so the run finds their cache entries."""
    from tools.cache_latents import model_dtype, vae_dtype

    args = types.SimpleNamespace(mixed_precision="bf16", no_half_vae=False)
    assert model_dtype(args, CPU) == vae_dtype(args, CPU) == torch.float32
    monkeypatch.setattr(device_setup, "cpu_has_fast_bf16", lambda: True)
    assert vae_dtype(args, CPU) == torch.bfloat16
    assert vae_dtype(types.SimpleNamespace(mixed_precision="bf16", no_half_vae=True), CPU) == torch.float32


def test_cache_tools_resolve_fp16_as_the_training_run_does():
    """fp16 needs CUDA (the run trains in float32 elsewhere); SDXL's VAE stays float32 under fp16."""
    from library.models.families import SD1, SDXL
    from tools.cache_latents import model_dtype, vae_dtype

    args = types.SimpleNamespace(mixed_precision="fp16", no_half_vae=False)
    assert model_dtype(args, CPU) == vae_dtype(args, CPU, SD1) == torch.float32
    cuda = torch.device("cuda")  # only resolved, never used
    assert model_dtype(args, cuda) == vae_dtype(args, cuda, SD1) == torch.float16
    assert vae_dtype(args, cuda, SDXL) == torch.float32


def test_a_bf16_lora_run_without_bf16_kernels_is_the_float32_run(slow_bf16, tiny_checkpoint, photo_dir, tmp_path):
    """The same command still trains, at float32 speed, and writes the float32 run's file."""
    from library.models import safetensors_io
    from library.models.frozen_weights import compute_dtype
    from library.training.script_parsers import network_parser
    from library.training.task_network import NetworkTask
    from library.training.train_args import parse_args
    from library.training.trainer import train

    model = tiny_checkpoint("sd1")
    files = {}
    for precision in ("bf16", "no"):
        out = tmp_path / precision
        argv = ["--pretrained_model_name_or_path", model, "--train_data_dir", str(photo_dir), "--output_dir", str(out),
                "--output_name", "lora", "--resolution", "64", "--train_batch_size", "2", "--caption_extension", ".txt",
                "--seed", "3", "--max_data_loader_n_workers", "0", "--max_train_steps", "2", "--network_module",
                "networks.lora", "--network_dim", "4", "--learning_rate", "1e-3", "--mixed_precision", precision]
        run = train(parse_args(network_parser(sdxl=False, description=""), argv), NetworkTask(sdxl=False))
        assert run.precision.mixed_precision == "no" and compute_dtype(run.models.unet) == torch.float32
        files[precision] = safetensors_io.load_tensors(str(out / "lora.safetensors"))
    assert files["bf16"].keys() == files["no"].keys()
    assert all(torch.equal(files["bf16"][k], files["no"][k]) for k in files["no"])
    assert any(float(v.abs().max()) > 0 for k, v in files["no"].items() if "lora_up" in k)
