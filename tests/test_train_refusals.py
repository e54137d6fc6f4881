"""Bad input to a training run: one line naming the file or flag, before any work is done, nothing lost.
--output_dir that cannot be written, runs that would train nothing, --network_weights of other shapes or
holding NaN, --resume of another rank or with a damaged or code-carrying optimizer file, and resuming after
a kill during the replacement of the end-of-run state folder."""

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from library.errors import UserError
from library.models import safetensors_io

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, write_photos):
    root = tmp_path_factory.mktemp("refusal-data")
    write_photos(str(root / "2_photo"), PHOTOS, lambda i: (64, 64), caption=lambda n: f"a photo of {n}")
    return str(root)


def argv(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", str(out),
            "--output_name", "lora", "--resolution", "64", "--train_batch_size", "2", "--caption_extension", ".txt",
            "--network_module", "networks.lora", "--network_dim", "4", "--learning_rate", "1e-3", "--seed", "7",
            "--max_data_loader_n_workers", "0", *extra]


def train(args):
    import train_network

    return train_network.main(args)


def error_line(capsys, args) -> str:
    """What a user sees: the script's stderr line and exit status 2, through library.cli.run."""
    from library.cli import run

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: train(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "\x1b" not in lines[0]
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model is loaded: the refusal must come first."""
    import library.models.loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(library.models.loading, "load_models", refuse)


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, data, tmp_path_factory):
    """A rank-4 LoRA trained 2 steps, with its end-of-run state folder `lora-state`."""
    out = tmp_path_factory.mktemp("refusal-trained")
    assert train(argv(tiny_checkpoint("sd1"), data, out, "--max_train_steps", "2", "--save_state")) == 0
    return out


# --- 9: the output folder ------------------------------------------------------------------------------------

def test_an_output_dir_that_is_a_file_is_refused_before_any_model_loads(tiny_checkpoint, data, tmp_path, capsys,
                                                                        no_model_load):
    (tmp_path / "out").write_text("notes")
    line = error_line(capsys, argv(tiny_checkpoint("sd1"), data, tmp_path / "out", "--max_train_steps", "2"))
    assert line == f"error: --output_dir {tmp_path / 'out'}: is a file, not a folder; give a folder to save into"
    assert (tmp_path / "out").read_text() == "notes"


def test_an_output_dir_that_cannot_be_written_is_refused_before_any_model_loads(tiny_checkpoint, data, no_model_load):
    target = "/sys/sdtrain-output"  # /sys refuses new entries, also to root
    if not os.path.isdir("/sys") or os.path.exists(target):
        pytest.skip("needs a /sys that refuses new folders")
    try:
        os.mkdir(target)
        os.rmdir(target)
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    with pytest.raises(UserError, match=rf"^--output_dir {target}: cannot write there \(.+\); give a folder you can"):
        train(argv(tiny_checkpoint("sd1"), data, target, "--max_train_steps", "2"))


# --- 10: a run that trains nothing ---------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--max_train_steps", "0"], "--max_train_steps 0: a run trains at least 1 step"),
    (["--max_train_epochs", "0"], "--max_train_epochs 0: a run trains at least 1 epoch"),
])
def test_a_run_that_would_train_nothing_is_refused_and_keeps_the_model(tiny_checkpoint, data, trained, tmp_path,
                                                                       no_model_load, flags, message):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    before = (out / "lora.safetensors").read_bytes()
    with pytest.raises(UserError, match=message):
        train(argv(tiny_checkpoint("sd1"), data, out, *flags))
    assert (out / "lora.safetensors").read_bytes() == before


# --- 8: network weights of other shapes, or holding NaN -----------------------------------------------------

def test_network_weights_of_another_rank_name_file_module_shapes_and_the_fix(tiny_checkpoint, data, trained,
                                                                            tmp_path, capsys):
    weights = str(trained / "lora.safetensors")
    line = error_line(capsys, argv(tiny_checkpoint("sd1"), data, tmp_path / "o", "--max_train_steps", "2",
                                   "--network_dim", "8", "--network_weights", weights))
    assert line.startswith(f"error: --network_weights {weights}: module lora_")
    assert "(lora_down.weight) has shape (4, " in line and "in the file but (8, " in line
    assert "(the file has rank 4, --network_dim is 8)" in line and line.endswith("add --dim_from_weights to take the "
                                                                            "ranks from the file")
    # the fix it names works: the ranks come from the file
    assert train(argv(tiny_checkpoint("sd1"), data, tmp_path / "o", "--max_train_steps", "1", "--network_dim", "8",
                      "--network_weights", weights, "--dim_from_weights")) == 0
    saved = safetensors_io.load_tensors(str(tmp_path / "o" / "lora.safetensors"))
    assert {t.shape[0] for k, t in saved.items() if k.endswith("lora_down.weight")} == {4}


def test_network_weights_holding_nan_are_refused_when_read(tiny_checkpoint, data, trained, tmp_path, no_model_load):
    tensors = safetensors_io.load_tensors(str(trained / "lora.safetensors"), zero_copy=False)
    key = sorted(k for k in tensors if k.endswith("lora_up.weight"))[0]
    tensors[key][0, 0] = float("nan")
    safetensors_io.save_tensors(tensors, str(tmp_path / "nan.safetensors"))
    with pytest.raises(UserError, match=rf"^{tmp_path / 'nan.safetensors'}: tensor {key} holds 1 NaN/inf value"):
        train(argv(tiny_checkpoint("sd1"), data, tmp_path / "o", "--max_train_steps", "2",
                   "--network_weights", str(tmp_path / "nan.safetensors")))


def test_resume_of_a_state_of_another_rank_names_the_file_and_the_rank(tiny_checkpoint, data, trained, tmp_path,
                                                                       capsys):
    state = trained / "lora-state"
    line = error_line(capsys, argv(tiny_checkpoint("sd1"), data, tmp_path / "o", "--max_train_steps", "4",
                                   "--network_dim", "8", "--resume", str(state)))
    assert line.startswith(f"error: --resume: {state / 'trainable.safetensors'}: module lora_")
    assert "(the file has rank 4, --network_dim is 8); resume with the --network_dim" in line
    assert not (tmp_path / "o" / "lora.safetensors").exists()


# --- 11: damaged or code-carrying optimizer state -------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("content", ["garbage", "pickle"])
def test_resume_with_a_bad_optimizer_file_is_one_line_of_ours(tiny_checkpoint, data, trained, tmp_path, capsys,
                                                              no_model_load, content):
    state = tmp_path / "lora-state"
    shutil.copytree(trained / "lora-state", state)
    marker = tmp_path / "code-ran"
    if content == "garbage":
        (state / "optimizer.pt").write_bytes(b"\x80\x02garbage" * 50)
    else:
        torch.save({"state": {0: _RunsCode(marker)}, "param_groups": []}, state / "optimizer.pt")
    line = error_line(capsys, argv(tiny_checkpoint("sd1"), data, tmp_path / "o", "--max_train_steps", "4",
                                   "--resume", str(state)))
    assert line.startswith(f"error: --resume: {state / 'optimizer.pt'}: ")
    if content == "pickle":
        assert "refused to load this optimizer state: the pickle asks for posix.system" in line \
            or "the pickle asks for nt.system" in line
    else:
        assert "cannot read this optimizer state" in line and "truncated or damaged" in line
    assert "weights_only" not in line and "\x1b" not in line
    assert not marker.exists()


# --- 15: a kill while the end-of-run state folder was being replaced ----------------------------------------

def test_resume_after_a_kill_during_the_state_replacement(tiny_checkpoint, data, trained, tmp_path, caplog):
    """The layout a kill between the two renames leaves (see tests/test_atomic_writes.py): no `lora-state`,
    the previous state set aside under a hidden `.old` name, a half-written temporary folder. `--resume
    lora-state` continues from the set-aside state exactly as an uninterrupted run, and the run's start puts
    it back and removes the temporary folder."""
    model = tiny_checkpoint("sd1")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(trained / "lora-state", out / f".lora-state.{dead}.abcd1234.old")
    (out / f".lora-state.{dead}.efgh5678.tmp").mkdir()
    (out / f".lora-state.{dead}.efgh5678.tmp" / "trainable.safetensors").write_bytes(b"half")
    with caplog.at_level(logging.INFO):
        assert train(argv(model, data, out, "--max_train_steps", "3", "--resume", str(out / "lora-state"))) == 0
    assert "resuming from that copy" in caplog.text and "at epoch 0, step 2" in caplog.text
    assert sorted(os.listdir(out)) == ["lora-state", "lora.safetensors"]
    straight = tmp_path / "straight"
    assert train(argv(model, data, straight, "--max_train_steps", "3")) == 0
    a = safetensors_io.load_tensors(str(straight / "lora.safetensors"))
    b = safetensors_io.load_tensors(str(out / "lora.safetensors"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
