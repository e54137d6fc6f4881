"""sd-scripts' run flags that change how a run logs, loads and feeds data: console log level and file,
tracker init arguments, modelspec metadata, persistent loader workers, reading models without mmap,
and --dataset_class (refused)."""

import logging
import os
import subprocess
import sys

import pytest

from library.errors import UserError
from library.models import safetensors_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory, write_photos):
    root = tmp_path_factory.mktemp("flags_data")
    write_photos(str(root / "2_subject"), PHOTOS, lambda i: (64, 64), caption=lambda name: f"a photo of {name}")
    return str(root)


def _network_args(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--output_name", "lora", "--resolution", "64", "--train_batch_size", "2", "--caption_extension", ".txt",
            "--network_module", "networks.lora", "--network_dim", "4", "--learning_rate", "1e-3", "--seed", "3",
            "--max_data_loader_n_workers", "0", *extra]


def _train(argv, sdxl=False):
    from library.training.script_parsers import network_parser
    from library.training.task_network import NetworkTask
    from library.training.train_args import parse_args
    from library.training.trainer import train

    return train(parse_args(network_parser(sdxl=sdxl, description=""), argv), NetworkTask(sdxl=sdxl))


def test_log_file_level_tracker_config_and_modelspec_flags(tmp_path, tiny_checkpoint, photos, restore_logging):
    pytest.importorskip("tensorboard")
    tracker_config = tmp_path / "trackers.toml"
    tracker_config.write_text('[tensorboard]\nfilename_suffix = ".sdtrain"\n', encoding="utf-8")
    log_file = tmp_path / "run.log"
    out = tmp_path / "out"
    _train(_network_args(
        tiny_checkpoint("sd1"), photos, str(out), "--max_train_steps", "2",
        "--console_log_file", str(log_file), "--console_log_level", "DEBUG",
        "--log_with", "tensorboard", "--logging_dir", str(tmp_path / "logs"), "--log_tracker_config", str(tracker_config),
        "--metadata_author", "Ann", "--metadata_license", "CC0", "--metadata_trigger_phrase", "sks"))
    # the log lines went to the file (with time and level), debug lines included
    text = log_file.read_text(encoding="utf-8")
    assert "INFO library.training.trainer: training network" in text and " DEBUG " in text
    assert logging.getLogger().level == logging.DEBUG
    # the tracker got the config's init arguments
    events = [name for _, _, files in os.walk(tmp_path / "logs") for name in files]
    assert events and all(name.endswith(".sdtrain") for name in events)
    # the modelspec flags are in the LoRA's metadata
    metadata = safetensors_io.read_header(str(out / "lora.safetensors")).metadata
    assert (metadata["modelspec.author"], metadata["modelspec.license"], metadata["modelspec.trigger_phrase"]) == \
        ("Ann", "CC0", "sks")


def test_a_bad_tracker_config_stops_before_any_model_loads(tmp_path, restore_logging):
    from library.training.script_parsers import network_parser
    from library.training.train_args import parse_args

    parser = network_parser(sdxl=False, description="")
    bad = tmp_path / "trackers.toml"
    bad.write_text("[tensorboard\n", encoding="utf-8")
    with pytest.raises(UserError, match="--log_tracker_config .*trackers.toml: not a readable TOML file"):
        parse_args(parser, ["--log_tracker_config", str(bad)])
    bad.write_text("[mlflow]\nx = 1\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"\[mlflow\] is not a tracker table"):
        parse_args(parser, ["--log_tracker_config", str(bad)])
    with pytest.raises(UserError, match="no such file"):
        parse_args(parser, ["--log_tracker_config", str(tmp_path / "missing.toml")])


class _PidDataset:
    """load_batch returns the id of the process that loaded it."""

    def load_batch(self, batch, epoch, step):
        return os.getpid()


class _Jobs:
    def __init__(self, epoch):
        self.epoch = epoch
        self.jobs = [(step, 0, [step]) for step in range(4)]


@pytest.mark.parametrize("persistent", [False, True])
def test_persistent_loader_workers_live_across_epochs(persistent):
    from types import SimpleNamespace

    from library.training import epoch_jobs

    run = SimpleNamespace(args=SimpleNamespace(max_data_loader_n_workers=1, persistent_data_loader_workers=persistent,
                                               cache_latents=False),
                          dataset=_PidDataset(), extra={}, latent_cache=None)
    pids = []
    for epoch in (1, 2, 3):
        items = list(epoch_jobs.epoch_loader(run, _Jobs(epoch)))
        assert [step for step, _, _ in items] == [0, 1, 2, 3]
        pids.append({pid for _, _, pid in items})
    assert all(len(p) == 1 and os.getpid() not in p for p in pids)
    assert (len(set().union(*pids)) == 1) is persistent
    run.extra.clear()


def test_disable_mmap_reads_tensors_into_memory(tmp_path, tiny_checkpoint, photos, monkeypatch):
    from library.models import checkpoint_io, loading

    path = tiny_checkpoint("sdxl")
    read = checkpoint_io.read_checkpoint
    asked = []

    def spy(*args, **kwargs):
        asked.append(kwargs.get("zero_copy"))
        return read(*args, **kwargs)

    monkeypatch.setattr(checkpoint_io, "read_checkpoint", spy)
    loading.load_models(path, zero_copy=False)
    assert asked == [False]  # read_checkpoint(zero_copy=False): tensors own their memory (test_safetensors_io)

    seen = {}

    def fake_load(*args, **kwargs):
        seen.update(kwargs)
        raise UserError("stop here")

    monkeypatch.setattr(loading, "load_models", fake_load)
    for extra, zero_copy in ((["--disable_mmap_load_safetensors"], False), ([], None)):
        with pytest.raises(UserError, match="stop here"):
            _train(_network_args(path, photos, str(tmp_path / "o"), "--max_train_steps", "1", *extra), sdxl=True)
        assert seen["zero_copy"] is zero_copy


def test_dataset_class_is_refused_in_one_line(tmp_path, photos):
    r = subprocess.run([sys.executable, "tools/check_dataset.py", "--train_data_dir", photos, "--resolution", "64",
                        "--dataset_class", "my.Dataset"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --dataset_class: ") and r.stderr.count("\n") == 1
    assert "--dataset_config" in r.stderr
