"""Trainer flags: --config_file precedence and checks, --output_config, save naming and pruning."""

import os

import pytest

from library.training import save_policy
from library.errors import UserError
from library.training.script_parsers import network_parser
from library.training.train_args import parse_args


@pytest.fixture(scope="module")
def parser():
    return network_parser(sdxl=False, description="test")


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_config_file_fills_values_and_cli_wins(parser, tmp_path):
    cfg = write(tmp_path / "c.toml", """
[model]
pretrained_model_name_or_path = "m.safetensors"
[training]
resolution = 512
learning_rate = 1e-4
max_train_steps = "30"
network_args = ["conv_dim=4", "conv_alpha=1"]
gradient_checkpointing = true
""")
    args = parse_args(parser, ["--config_file", cfg, "--learning_rate", "5e-5"])
    assert args.pretrained_model_name_or_path == "m.safetensors"
    assert args.learning_rate == 5e-5  # CLI > TOML
    assert args.max_train_steps == 30  # converted by the flag's own type
    assert args.resolution == "512"
    assert args.network_args == ["conv_dim=4", "conv_alpha=1"]
    assert args.gradient_checkpointing is True


def test_config_file_without_extension(parser, tmp_path):
    write(tmp_path / "noext.toml", "network_dim = 8\n")
    assert parse_args(parser, ["--config_file", str(tmp_path / "noext")]).network_dim == 8


@pytest.mark.parametrize("text, message", [
    ("max_train_steps = \"many\"\n", "max_train_steps = 'many' is not valid"),
    ("gradient_checkpointing = 2\n", "is a flag: write true or false"),
    ("max_train_steps = 2.5\n", "must be a whole number"),
    ("resume = true\n", "takes a value, not true"),
    ("mixed_precision = \"fp8\"\n", "is not one of"),
    ("a = [\n", "not valid TOML"),
])
def test_config_file_errors_name_the_file_and_key(parser, tmp_path, text, message):
    cfg = write(tmp_path / "bad.toml", text)
    with pytest.raises(UserError, match="bad.toml"):
        parse_args(parser, ["--config_file", cfg])
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_args(parser, ["--config_file", cfg])


def test_output_config_writes_non_defaults(parser, tmp_path):
    out = str(tmp_path / "out.toml")
    with pytest.raises(SystemExit) as e:
        parse_args(parser, ["--output_config", "--config_file", out, "--network_dim", "16", "--learning_rate", "3e-4"])
    assert e.value.code == 0
    text = open(out, encoding="utf-8").read()
    assert "network_dim = 16" in text and "learning_rate" in text and "config_file" not in text
    args = parse_args(parser, ["--config_file", out])
    assert args.network_dim == 16 and args.learning_rate == 3e-4
    with pytest.raises(UserError, match="already exists"):
        parse_args(parser, ["--output_config", "--config_file", out])


def test_save_names_and_pruning(tmp_path):
    policy = save_policy.SavePolicy(str(tmp_path), "lora", ".safetensors", every_n_epochs=2, every_n_steps=10,
                                    keep_last_n_epochs=2, keep_last_n_steps=20)
    assert save_policy.epoch_name("lora", 4, ".safetensors") == "lora-000004.safetensors"
    assert save_policy.step_name("lora", 120, ".safetensors") == "lora-step00000120.safetensors"
    assert save_policy.step_state_name("lora", 120) == "lora-step00000120-state"
    assert policy.epoch_due(2, 10) and not policy.epoch_due(3, 10) and not policy.epoch_due(10, 10)
    assert policy.epoch_to_remove(6, 2) == 2 and policy.epoch_to_remove(4, 2) is None
    assert policy.step_to_remove(50, 20) == 20  # 50 - 20 - 1 = 29 -> 20
    for e in (2, 4, 6):
        (tmp_path / save_policy.epoch_name("lora", e, ".safetensors")).write_text("x")
    policy.prune_after_epoch(6)
    assert sorted(os.listdir(tmp_path)) == ["lora-000004.safetensors", "lora-000006.safetensors"]


def test_hub_and_deepspeed_flags_parse_but_using_them_is_refused(parser, tmp_path):
    """Configs written for sd-scripts carry these keys; only turning them on is an error."""
    config = tmp_path / "c.toml"
    config.write_text('huggingface_repo_visibility = "private"\nzero_stage = 2\nasync_upload = true\n', encoding="utf-8")
    args = parse_args(parser, ["--config_file", str(config), "--output_dir", str(tmp_path)])
    assert args.zero_stage == 2 and args.async_upload
    with pytest.raises(UserError, match="--deepspeed is not supported; train on several GPUs with `accelerate launch"):
        parse_args(parser, ["--deepspeed"])
    with pytest.raises(UserError, match="uploading to the Hugging Face Hub is not supported"):
        parse_args(parser, ["--huggingface_repo_id", "me/my-lora"])
    with pytest.raises(UserError, match="--resume_from_huggingface: states are not downloaded"):
        parse_args(parser, ["--resume_from_huggingface"])


@pytest.mark.parametrize("argv, line", [
    (["--learning_rate", "-1"], "--learning_rate -1.0: a learning rate must be 0 or more"),
    (["--unet_lr", "nan"], "--unet_lr nan: a learning rate must be 0 or more"),
    (["--text_encoder_lr", "1e-4", "-0.5"], "--text_encoder_lr -0.5: a learning rate must be 0 or more"),
])
def test_negative_learning_rates_name_their_flag(parser, argv, line):
    with pytest.raises(UserError) as caught:
        parse_args(parser, argv)
    assert str(caught.value).startswith(line) and "\n" not in str(caught.value)
    assert parse_args(parser, ["--learning_rate", "0", "--text_encoder_lr", "0"]).learning_rate == 0.0


def test_network_dim_below_one_names_the_flag(parser, tmp_path):
    from library.training.task_network import NetworkTask

    args = parse_args(parser, ["--network_dim", "0", "--output_dir", str(tmp_path)])
    with pytest.raises(UserError, match=r"^--network_dim 0: the network's rank must be 1 or more"):
        NetworkTask(sdxl=False).validate_args(args)
