"""--config_file as sd-scripts reads it, with types kept: every option kind survives a TOML round trip,
false / "" / [] mean "not set", and keys naming no option are one warning line (an error with
--config_strict) saying what each key is."""

import argparse
import logging

import pytest

from library.errors import UserError
from library.refused_options import REFUSED
from library.training import script_parsers
from library.training.lr_schedulers import steps_or_fraction
from library.training.train_args import parse_args

SKIPPED = {"help", "config_file", "output_config", "config_strict", "wandb_api_key"}


def _value_tokens(action: argparse.Action, index: int) -> list:
    """Command-line tokens giving `action` a value other than its default (distinct per option)."""
    if isinstance(action, argparse._StoreTrueAction):
        return []
    if action.choices is not None:
        return [str(next(c for c in action.choices if c is not None and c != action.default))]
    kind = action.type
    if kind is int:
        one = [str(3 + index % 5)]
    elif kind is float:
        one = [str(0.25 + index / 1000)]
    elif kind is steps_or_fraction:
        one = ["0.125"]
    else:  # str, Path and untyped options
        one = [f"v{index}=x,{index}"]
    if action.nargs == "*":
        return one + ([str(0.5)] if kind is float else [f"w{index}=y"])
    return one


def _cli_for_every_option(parser: argparse.ArgumentParser, files: dict) -> list:
    """Every option set; those naming a file that is read at once (`files`: dest → path) get a real one."""
    argv = []
    for index, action in enumerate(parser._actions):
        if action.dest in SKIPPED or action.dest in REFUSED or getattr(action, "sdxl", False):
            continue
        value = [files[action.dest]] if action.dest in files else _value_tokens(action, index)
        argv += [action.option_strings[0], *value]
    return argv


def _files_read_at_parse(tmp_path) -> dict:
    trackers = tmp_path / "trackers.toml"
    trackers.write_text("[tensorboard]\nflush_secs = 5\n", encoding="utf-8")
    return {"log_tracker_config": str(trackers), "console_log_file": str(tmp_path / "console.log")}


@pytest.mark.parametrize("script", sorted(script_parsers.TRAINER_SCRIPTS))
def test_every_option_survives_output_config_then_config_file(script, tmp_path, restore_logging):
    parser = script_parsers.TRAINER_SCRIPTS[script]()
    argv = _cli_for_every_option(parser, _files_read_at_parse(tmp_path))
    from_cli = parse_args(parser, argv)
    path = str(tmp_path / "all.toml")
    with pytest.raises(SystemExit) as done:
        parse_args(parser, argv + ["--output_config", "--config_file", path])
    assert done.value.code == 0
    from_file = parse_args(parser, ["--config_file", path])
    expected = {k: v for k, v in vars(from_cli).items() if k not in ("config_file", "output_config")}
    got = {k: v for k, v in vars(from_file).items() if k not in ("config_file", "output_config")}
    differ = {k: (expected[k], got[k]) for k in expected if expected[k] != got[k] or type(expected[k]) is not type(got[k])}
    assert differ == {}
    # every kind of option really was set to something other than its default
    defaults = parser.parse_args([])
    unchanged = [a.dest for a in parser._actions if a.dest not in SKIPPED | set(REFUSED) and not getattr(a, "sdxl", False)
                 and getattr(defaults, a.dest) == getattr(from_file, a.dest)]
    assert unchanged == []


@pytest.fixture(scope="module")
def network():
    return script_parsers.network_parser(sdxl=False, description="")


def config(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_false_empty_and_empty_lists_leave_options_unset(network, tmp_path):
    """resume = false must not become the string "False"; "" and [] are sd-scripts' "not set" too."""
    cfg = config(tmp_path, """
resume = false
network_weights = ""
network_args = []
lr_scheduler_args = []
network_module = ""
max_train_steps = false
network_dropout = 0
seed = 0
""")
    args = parse_args(network, ["--config_file", cfg])
    assert args.resume is None and args.network_weights is None
    assert args.network_args is None and args.lr_scheduler_args is None
    assert args.network_module == "networks.lora" and args.max_train_steps == 1600  # the defaults
    assert args.network_dropout == 0.0 and args.seed == 0  # 0 is a value, not "unset"


def test_types_are_kept_and_converted_by_each_option(network, tmp_path):
    cfg = config(tmp_path, """
[model_arguments]
v2 = false
[training_arguments]
resolution = [768, 512]
max_train_steps = 12.0
learning_rate = 1
lr_warmup_steps = 0.1
text_encoder_lr = 5e-5
network_alpha = 4
persistent_data_loader_workers = 1
gradient_checkpointing = 0
max_token_length = 225
sample_sampler = "euler_a"
dataset_config = "data.toml"
""")
    args = parse_args(network, ["--config_file", cfg])
    assert args.resolution == "768,512"  # a [W, H] list as the command line writes it
    assert args.max_train_steps == 12 and isinstance(args.max_train_steps, int)
    assert args.learning_rate == 1.0 and isinstance(args.learning_rate, float)
    assert args.lr_warmup_steps == 0.1
    assert args.text_encoder_lr == [5e-5] and args.network_alpha == 4.0
    assert args.persistent_data_loader_workers is True and args.gradient_checkpointing is False  # GUI's 1 / 0
    assert args.max_token_length == 225 and args.sample_sampler == "euler_a"
    assert str(args.dataset_config) == "data.toml" and args.v2 is False


def test_command_line_wins_over_the_file(network, tmp_path):
    cfg = config(tmp_path, 'network_dim = 8\nresume = "state-a"\noutput_name = "a"\n')
    args = parse_args(network, ["--config_file", cfg, "--network_dim=16", "--resume", "state-b"])
    assert (args.network_dim, args.resume, args.output_name) == (16, "state-b", "a")


def test_unknown_keys_are_one_warning_line_saying_what_each_is(tmp_path, caplog):
    parser = script_parsers.db_parser("")
    parser.prog = "train_db.py"
    cfg = config(tmp_path, """
epoch = 10
noise_offset_type = "Original"
lr_restart_cycles = 2
network_dim = 8
scale_weight_norms = 1.0
learning_rat = 1e-4
clip_l = "clip_l.safetensors"
zzz_unheard_of = 1
learning_rate = 2e-6
""")
    with caplog.at_level(logging.WARNING):
        args = parse_args(parser, ["--config_file", cfg])
    assert args.learning_rate == 2e-6
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0]
    line = lines[0]
    assert "8 keys that name no option of train_db.py" in line
    assert "kohya_ss GUI settings: epoch (" in line and "noise_offset_type (" in line
    assert "lr_restart_cycles (use lr_scheduler_num_cycles)" in line
    assert "options of train_network.py, sdxl_train_network.py: scale_weight_norms;" in line
    assert "options of train_network.py, sdxl_train_network.py, sdxl_train_control_net_lllite.py: network_dim;" in line
    assert "unknown: learning_rat (did you mean learning_rate?), zzz_unheard_of" in line
    assert "SD3/FLUX scripts: clip_l" in line
    assert "--config_strict" in line

    with pytest.raises(UserError, match=r"8 keys name no option of train_db.py: .*\(--config_strict\)$"):
        parse_args(parser, ["--config_file", cfg, "--config_strict"])
    strict_in_file = config(tmp_path, "config_strict = true\nepoch = 3\n", "strict.toml")
    with pytest.raises(UserError, match="epoch"):
        parse_args(parser, ["--config_file", strict_in_file])


def test_sdxl_scripts_accept_v2_false_and_refuse_v2_true(tmp_path):
    for build in (lambda: script_parsers.network_parser(True, ""), lambda: script_parsers.sdxl_train_parser(""),
                  lambda: script_parsers.ti_parser(True, "")):
        parser = build()
        assert parse_args(parser, ["--config_file", config(tmp_path, "v2 = false\n")]).v2 is False
        with pytest.raises(UserError, match=r"^--v2: SDXL is not SD 2.x"):
            parse_args(parser, ["--v2"])
        with pytest.raises(UserError, match=r"^--v2: SDXL"):
            parse_args(parser, ["--config_file", config(tmp_path, "v2 = true\n", "v2.toml")])
    assert parse_args(script_parsers.network_parser(False, ""), ["--v2"]).v2 is True  # SD2 on the SD1/2 script


def test_dataset_config_stays_strict_as_in_sd_scripts(network, tmp_path):
    """sd-scripts validates --dataset_config with a schema that rejects unknown keys; so do we, while the
    same key in --config_file is only named in the warning line."""
    from library.data.config import load_dataset_config

    dataset = config(tmp_path, '[general]\nepoch = 10\n[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n'
                               '  image_dir = "img"\n', "dataset.toml")
    args = parse_args(network, ["--config_file", config(tmp_path, "epoch = 10\n"), "--dataset_config", dataset])
    with pytest.raises(UserError, match=r"dataset.toml: \[general\]: unknown key 'epoch'"):
        load_dataset_config(args.dataset_config, args)
