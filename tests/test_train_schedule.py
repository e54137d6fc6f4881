"""Where a run starts (--initial_step / --initial_epoch), the validation split, --torch_compile."""

import os

import pytest

from library.models import safetensors_io
from library.errors import UserError

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry"]


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, write_photos):
    """`1_subject`: six captioned photos, two aspect ratios."""
    root = tmp_path_factory.mktemp("schedule_data")
    write_photos(str(root / "1_subject"), PHOTOS, lambda i: (64 + 64 * (i % 2), 64), lambda name: f"a photo of {name}")
    return str(root)


def lora_args(model, data, out, *extra):
    return [
        "--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
        "--output_name", "lora", "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "64",
        "--max_bucket_reso", "128", "--bucket_reso_steps", "64", "--train_batch_size", "1", "--caption_extension",
        ".txt", "--network_module", "networks.lora", "--network_dim", "4", "--learning_rate", "1e-3", "--seed", "5",
        "--max_data_loader_n_workers", "0", "--cache_latents", *extra,
    ]


def run_training(argv):
    from library.training.script_parsers import network_parser
    from library.training.task_network import NetworkTask
    from library.training.train_args import parse_args
    from library.training.trainer import train

    return train(parse_args(network_parser(sdxl=False, description=""), argv), NetworkTask(sdxl=False))


@pytest.fixture
def loaded_batches(monkeypatch):
    """Every (step, image paths) the loop loads, in order."""
    from library.data.train_dataset import TrainDataset

    seen = []
    original = TrainDataset.load_batch

    def record(self, batch, epoch, global_step):
        out = original(self, batch, epoch, global_step)
        if self.split == "train":
            seen.append((global_step, tuple(out["image_paths"])))
        return out

    monkeypatch.setattr(TrainDataset, "load_batch", record)
    return seen


# ---------------------------------------------------------------------------------------------
# --initial_step / --initial_epoch


def test_initial_step_with_skip_continues_exactly_where_a_full_run_is(tiny_checkpoint, photo_dir, tmp_path,
                                                                       loaded_batches):
    model = tiny_checkpoint("sd1")
    run_training(lora_args(model, photo_dir, str(tmp_path / "full"), "--max_train_steps", "8"))
    full = list(loaded_batches)
    assert [s for s, _ in full] == list(range(8))
    loaded_batches.clear()
    run = run_training(lora_args(model, photo_dir, str(tmp_path / "skip"), "--max_train_steps", "8",
                                 "--initial_step", "5", "--skip_until_initial_step"))
    assert loaded_batches == full[5:]  # the same batches at the same steps; nothing before step 5 loaded
    assert safetensors_io.read_metadata(str(tmp_path / "skip" / "lora.safetensors"))["ss_steps"] == "8"
    assert run.steps_per_epoch == 6


def test_initial_step_without_skip_starts_at_its_epoch(tiny_checkpoint, photo_dir, tmp_path, loaded_batches):
    model = tiny_checkpoint("sd1")
    # 6 steps per epoch: step 8 lies in epoch 2, which starts at step 6
    run_training(lora_args(model, photo_dir, str(tmp_path / "o"), "--max_train_epochs", "3", "--initial_step", "8",
                           "--save_every_n_epochs", "1"))
    assert [s for s, _ in loaded_batches] == list(range(6, 18))
    assert sorted(os.listdir(tmp_path / "o")) == ["lora-000002.safetensors", "lora.safetensors"]
    loaded_batches.clear()
    run_training(lora_args(model, photo_dir, str(tmp_path / "e"), "--max_train_epochs", "3", "--initial_epoch", "3"))
    assert [s for s, _ in loaded_batches] == list(range(12, 18))


def test_initial_step_errors(tiny_checkpoint, photo_dir, tmp_path):
    model = tiny_checkpoint("sd1")
    with pytest.raises(UserError, match=r"--initial_step 9 starts at step 9, but the run has only 4 steps"):
        run_training(lora_args(model, photo_dir, str(tmp_path / "o"), "--max_train_steps", "4", "--initial_step", "9"))
    with pytest.raises(UserError, match="epochs count from 1"):
        run_training(lora_args(model, photo_dir, str(tmp_path / "o"), "--max_train_steps", "4", "--initial_epoch", "0"))


# ---------------------------------------------------------------------------------------------
# validation


def test_validation_split_holds_out_images_and_measures_them(tiny_checkpoint, photo_dir, tmp_path, monkeypatch):
    from library.training.train_logging import TrainLogger
    from library.training.validation import Validator

    passes = []
    original = TrainLogger.validation

    def record(self, kind, index, loss):
        passes.append((kind, index, loss))
        original(self, kind, index, loss)

    monkeypatch.setattr(TrainLogger, "validation", record)
    logs = tmp_path / "logs"
    run = run_training(lora_args(tiny_checkpoint("sd1"), photo_dir, str(tmp_path / "o"), "--max_train_epochs", "1",
                                 "--validation_split", "0.34", "--validation_seed", "3", "--validate_every_n_steps",
                                 "2", "--log_with", "tensorboard", "--logging_dir", str(logs)))
    held_out = run.extra["validation_dataset"]
    train_paths = {run.dataset.sample_path(i) for i in range(len(run.dataset))}
    held_paths = {held_out.sample_path(i) for i in range(len(held_out))}
    assert len(train_paths) == 4 and len(held_paths) == 2 and not train_paths & held_paths  # ceil(6·0.66), round(6·0.34)
    assert [(kind, index) for kind, index, _ in passes] == [("step", 2), ("step", 4), ("epoch", 1)]
    losses = [loss for _, _, loss in passes]
    assert losses[0] != losses[1]  # the weights changed between passes...
    assert losses[1] == losses[2]  # ...and nothing else: step 4 ended the epoch
    task = run.extra["task"]
    assert Validator.from_run(run, task).loss() == pytest.approx(losses[2], abs=1e-7)  # same noise, captions, crops

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (folder,) = list(logs.iterdir())
    events = EventAccumulator(str(folder))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/validation/step_average", "loss/validation/step_divergence", "loss/validation/epoch_average",
            "loss/validation/epoch_divergence"} <= tags
    assert [e.step for e in events.Scalars("loss/validation/step_average")] == [2, 4]


def test_validation_timesteps_follow_sd_scripts():
    from library.training.validation import validation_timesteps

    assert validation_timesteps(None, None) == [200, 400, 600, 800]
    assert validation_timesteps(100, 600) == [200, 300, 400, 500]


# ---------------------------------------------------------------------------------------------
# --torch_compile


def test_torch_compile_trains_the_same_lora(tiny_checkpoint, photo_dir, tmp_path):
    model = tiny_checkpoint("sd1")
    run_training(lora_args(model, photo_dir, str(tmp_path / "plain"), "--max_train_steps", "2"))
    run = run_training(lora_args(model, photo_dir, str(tmp_path / "compiled"), "--max_train_steps", "2",
                                 "--torch_compile", "--dynamo_backend", "eager"))
    assert run.models.unet._compiled_call_impl is not None
    a = safetensors_io.load_tensors(str(tmp_path / "plain" / "lora.safetensors"))
    b = safetensors_io.load_tensors(str(tmp_path / "compiled" / "lora.safetensors"))
    assert a.keys() == b.keys()
    # compiled, the frozen layers run torch's own kernels (not the CPU weight-row blocks), so the
    # gradients differ by float32 rounding; Adam's first steps scale near-zero gradients up to full
    # steps, so the factors differ by up to a few 1e-5 here, against up factors of up to 2e-3
    assert max(float(a[k].abs().max()) for k in a if "lora_up" in k) > 1e-3
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-4
    with pytest.raises(UserError, match="--dynamo_backend nosuch: unknown"):
        run_training(lora_args(model, photo_dir, str(tmp_path / "x"), "--max_train_steps", "1", "--torch_compile",
                               "--dynamo_backend", "nosuch"))
