"""train_db.py, fine_tune.py and sdxl_train.py end to end on tiny models and photos from scikit-image."""

import json

import pytest
import torch
from PIL import Image

from library.models import safetensors_io
from library.errors import UserError

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """`4_subject` (captions) and `1_person` (regularisation) DreamBooth folders, plus fine-tune metadata."""
    import skimage.data

    root = tmp_path_factory.mktemp("full_data")
    train, reg = root / "train" / "4_subject", root / "reg" / "1_person"
    train.mkdir(parents=True)
    reg.mkdir(parents=True)
    metadata = {}
    for i, name in enumerate(PHOTOS):
        image = Image.fromarray(getattr(skimage.data, name)()[..., :3]).resize((96 + 32 * (i % 2), 96))
        image.save(train / f"{name}.png")
        (train / f"{name}.txt").write_text(f"a photo of {name}", encoding="utf-8")
        metadata[name] = {"caption": f"a photo of {name}"}
        if i < 2:
            image.transpose(Image.FLIP_LEFT_RIGHT).save(reg / f"{name}.png")
    (root / "meta.json").write_text(json.dumps(metadata), encoding="utf-8")
    return root


def common(model, out, *extra):
    return [
        "--pretrained_model_name_or_path", model, "--output_dir", str(out), "--output_name", "model",
        "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128",
        "--bucket_reso_steps", "64", "--train_batch_size", "2", "--caption_extension", ".txt",
        "--learning_rate", "2e-4", "--seed", "7", "--max_data_loader_n_workers", "0", *extra,
    ]


def db_args(model, data, out, *extra):
    return common(model, out, "--train_data_dir", str(data / "train"), *extra)


def ft_args(model, data, out, *extra):
    return common(model, out, "--train_data_dir", str(data / "train" / "4_subject"), "--in_json",
                  str(data / "meta.json"), *extra)


def sdxl_args(model, data, out, *extra):
    args = db_args(model, data, out, *extra)
    args[args.index("--bucket_reso_steps") + 1] = "32"
    return args


def train(script, argv):
    from library.training import script_parsers
    from library.training.task_full import FullModelTask
    from library.training.train_args import parse_args
    from library.training.trainer import train as run_training

    parser = {"db": script_parsers.db_parser, "fine_tune": script_parsers.fine_tune_parser,
              "sdxl": script_parsers.sdxl_train_parser}[script]
    return run_training(parse_args(parser(description=""), argv), FullModelTask(script))


def fixed_loss(run, task, n_batches=4):
    """Mean loss over the first batches of epoch 1 with fixed noise and timesteps."""
    from library.training.run import step_generator
    from library.training.step_loss import micro_step_loss

    batches = run.dataset.epoch_batches(1)
    values = []
    with torch.no_grad():
        for k in range(min(n_batches, len(batches))):
            batch = run.dataset.load_batch(batches[k], 1, 0)
            values.append(float(micro_step_loss(run, task, batch, step_generator(123, k, 0, run.device))))
    return sum(values) / len(values)


def loss_with_base_weights(run, task, base):
    """`fixed_loss` after putting the base model's U-Net and text encoders back into the run."""
    from library.models.clip_convert import classic_to_model_keys

    original = component_states(base)
    with torch.no_grad():
        run.models.unet.load_state_dict(original["unet"])
        for i, te in enumerate(run.models.text_encoders):
            te.load_state_dict(classic_to_model_keys(original[f"te{i + 1}"], te), strict=False)
    return fixed_loss(run, task)


def component_states(path):
    from library.models.clip_convert import model_to_classic_keys
    from library.models.loading import load_models

    models = load_models(path)
    out = {"unet": models.unet.state_dict(), "vae": models.vae.state_dict()}
    for i, te in enumerate(models.text_encoders):
        out[f"te{i + 1}"] = model_to_classic_keys(te.state_dict(), te)
    return out


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ---------------------------------------------------------------------------------------------
# train_db.py


def test_train_db_loss_falls_and_saved_model_loads(tiny_checkpoint, photo_dir, tmp_path):
    base = tiny_checkpoint("sd1")
    run = train("db", db_args(base, photo_dir, tmp_path, "--max_train_steps", "6", "--cache_latents",
                              "--save_model_as", "safetensors", "--no_token_padding"))
    task = run.extra["task"]
    trained_loss = fixed_loss(run, task)
    saved = component_states(str(tmp_path / "model.safetensors"))
    original = component_states(base)
    assert max_diff(saved["unet"], original["unet"]) > 1e-4
    assert max_diff(saved["te1"], original["te1"]) > 1e-4  # train_db trains the text encoder by default
    assert max_diff(saved["vae"], original["vae"]) == 0
    meta = safetensors_io.read_metadata(str(tmp_path / "model.safetensors"))
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["modelspec.title"] == "model"
    base_loss = loss_with_base_weights(run, task, base)
    assert trained_loss < base_loss * 0.97, (trained_loss, base_loss)


def test_train_db_resume_with_text_encoder_stop_and_ema(tiny_checkpoint, photo_dir, tmp_path):
    """A run resumed from step 2 ends where the straight run does (weights and EMA); the text
    encoder stopped after step 1 in both; the saved file is the EMA one."""
    from library.training.train_state import WEIGHTS_FILE

    base = tiny_checkpoint("sd1")
    extra = ["--max_train_steps", "4", "--stop_text_encoder_training", "1", "--learning_rate_te", "1e-4",
             "--ema_decay", "0.5", "--save_ema", "--save_state_on_train_end", "--reg_data_dir",
             str(photo_dir / "reg"), "--prior_loss_weight", "0.5"]
    straight = tmp_path / "straight"
    train("db", db_args(base, photo_dir, straight, *extra, "--save_every_n_steps", "1", "--save_state"))
    resumed = tmp_path / "resumed"
    train("db", db_args(base, photo_dir, resumed, *extra, "--resume", str(straight / "model-step00000002-state")))

    a = safetensors_io.load_tensors(str(straight / "model-state" / WEIGHTS_FILE))
    b = safetensors_io.load_tensors(str(resumed / "model-state" / WEIGHTS_FILE))
    assert any(k.startswith("__ema__.") for k in a)
    assert max_diff(a, b) <= 1e-6

    step1 = safetensors_io.load_tensors(str(straight / "model-step00000001-state" / WEIGHTS_FILE))
    te = [k for k in a if k.startswith("text_encoder.")]
    unet = [k for k in a if k.startswith("unet.")]
    assert te and unet
    assert max(float((a[k] - step1[k]).abs().max()) for k in te) == 0  # frozen after step 1
    from library.models.loading import load_models
    base_te = load_models(base).text_encoders[0].state_dict()
    assert max(float((step1[k] - base_te[k[len("text_encoder."):]]).abs().max()) for k in te) > 0  # trained in step 1
    assert max(float((a[k] - step1[k]).abs().max()) for k in unet) > 0

    # ckpt by default (single-file source); with --save_ema it holds the EMA, not the raw weights
    assert (straight / "model.ckpt").is_file() and (straight / "model-step00000001.ckpt").is_file()
    saved = component_states(str(straight / "model.ckpt"))["unet"]
    raw = {k[len("unet."):]: v for k, v in a.items() if k.startswith("unet.")}
    assert max_diff(saved, raw) > 1e-6
    assert int(a["__ema__.num_updates"][0]) == 4


# ---------------------------------------------------------------------------------------------
# fine_tune.py


def test_fine_tune_without_latent_cache_saves_a_diffusers_folder(tiny_checkpoint, photo_dir, tmp_path):
    base = tiny_checkpoint("sd1")
    run = train("fine_tune", ft_args(base, photo_dir, tmp_path, "--max_train_steps", "4", "--save_model_as",
                                     "diffusers", "--use_safetensors"))
    trained_loss = fixed_loss(run, run.extra["task"])
    assert trained_loss < loss_with_base_weights(run, run.extra["task"], base) * 0.97
    folder = tmp_path / "model"
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    saved, original = component_states(str(folder)), component_states(base)
    assert max_diff(saved["unet"], original["unet"]) > 1e-5
    assert max_diff(saved["te1"], original["te1"]) == 0  # U-Net only by default
    assert max_diff(saved["vae"], original["vae"]) == 0


def test_fine_tune_mixed_precision_starts_from_the_exact_float32_base(tiny_checkpoint, photo_dir, tmp_path, monkeypatch):
    """Trained parts are float32 copies of the file, not bf16-rounded ones; frozen ones stay bf16."""
    from library.models import device_setup

    monkeypatch.setattr(device_setup, "cpu_has_fast_bf16", lambda: True)  # as on a CPU with bf16 kernels
    base = tiny_checkpoint("sd1")
    run = train("fine_tune", ft_args(base, photo_dir, tmp_path, "--max_train_steps", "1", "--mixed_precision", "bf16",
                                     "--learning_rate", "1e-30", "--max_grad_norm", "0", "--cache_latents"))
    unet = run.models.unet.state_dict()
    assert all(v.dtype == torch.float32 for v in unet.values())
    assert next(run.models.text_encoders[0].parameters()).dtype == torch.bfloat16
    original = component_states(base)["unet"]
    assert max_diff(unet, original) == 0


def test_fine_tune_needs_metadata(tiny_checkpoint, photo_dir, tmp_path):
    with pytest.raises(UserError, match="--in_json"):
        train("fine_tune", common(tiny_checkpoint("sd1"), tmp_path, "--train_data_dir", str(photo_dir / "train")))


# ---------------------------------------------------------------------------------------------
# sdxl_train.py


def test_block_lr_maps_every_sdxl_block(tiny_checkpoint):
    from library.models.loading import load_models
    from library.training.task_full import parse_block_lr, unet_block_indices

    unet = load_models(tiny_checkpoint("sdxl")).unet
    index = unet_block_indices(unet)
    assert set(index.values()) == set(range(23))
    assert index["time_embedding.linear_1.weight"] == 0 and index["add_embedding.linear_2.bias"] == 0
    assert index["conv_in.weight"] == 1
    assert index["down_blocks.1.attentions.0.proj_in.weight"] == 5  # input_blocks.4.1
    assert index["down_blocks.0.downsamplers.0.conv.weight"] == 4  # input_blocks.3.0
    assert index["mid_block.resnets.0.conv1.weight"] == 10 and index["mid_block.attentions.0.proj_out.bias"] == 11
    assert index["mid_block.resnets.1.conv2.weight"] == 12
    assert index["up_blocks.0.resnets.0.conv1.weight"] == 13
    assert index["up_blocks.0.upsamplers.0.conv.weight"] == 15  # output_blocks.2.2
    assert index["conv_out.weight"] == 22 and index["conv_norm_out.weight"] == 22
    with pytest.raises(UserError, match="23"):
        parse_block_lr("1e-4,2e-4")


def test_sdxl_block_lr_and_text_encoder_lrs(tiny_checkpoint, photo_dir, tmp_path):
    base = tiny_checkpoint("sdxl")
    lrs = ["1e-3"] * 23
    lrs[0] = lrs[22] = "0"  # embeddings and the out block frozen
    run = train("sdxl", sdxl_args(base, photo_dir, tmp_path, "--max_train_steps", "3", "--cache_latents",
                                  "--block_lr", ",".join(lrs), "--train_text_encoder", "--learning_rate_te1", "0",
                                  "--learning_rate_te2", "1e-4", "--save_model_as", "safetensors"))
    task = run.extra["task"]
    assert [task.trains_text_encoder(i) for i in (0, 1)] == [False, True]
    assert len(run.optimizer.param_groups) == 21 + 1  # 21 U-Net blocks + text encoder 2
    assert [g["lr"] for g in run.optimizer.param_groups] == [1e-3] * 21 + [1e-4]
    saved, original = component_states(str(tmp_path / "model.safetensors")), component_states(base)
    frozen = [k for k in saved["unet"] if k.startswith(("time_embedding.", "add_embedding.", "conv_out.", "conv_norm_out."))]
    assert frozen and all(torch.equal(saved["unet"][k], original["unet"][k]) for k in frozen)
    assert max(float((saved["unet"][k] - original["unet"][k]).abs().max()) for k in saved["unet"] if k not in frozen) > 0
    assert max_diff(saved["te1"], original["te1"]) == 0
    assert max_diff(saved["te2"], original["te2"]) > 0
    assert max_diff(saved["vae"], original["vae"]) == 0
    trained_loss = fixed_loss(run, task)
    assert trained_loss < loss_with_base_weights(run, task, base) * 0.97


def test_sdxl_resume_with_fused_adafactor_and_both_text_encoders(tiny_checkpoint, photo_dir, tmp_path):
    from library.training.train_state import WEIGHTS_FILE

    base = tiny_checkpoint("sdxl")
    extra = ["--max_train_steps", "3", "--cache_latents", "--train_text_encoder", "--learning_rate", "1e-3",
             "--learning_rate_te1", "1e-4", "--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False",
             "scale_parameter=False", "--fused_backward_pass", "--save_state_on_train_end"]
    straight = tmp_path / "straight"
    train("sdxl", sdxl_args(base, photo_dir, straight, *extra, "--save_every_n_steps", "2", "--save_state"))
    resumed = tmp_path / "resumed"
    train("sdxl", sdxl_args(base, photo_dir, resumed, *extra, "--resume", str(straight / "model-step00000002-state")))
    a = safetensors_io.load_tensors(str(straight / "model-state" / WEIGHTS_FILE))
    b = safetensors_io.load_tensors(str(resumed / "model-state" / WEIGHTS_FILE))
    assert {k.split(".")[0] for k in a} == {"unet", "text_encoder", "text_encoder_2", "__task__"}
    assert max_diff(a, b) <= 1e-6
    step2 = safetensors_io.load_tensors(str(straight / "model-step00000002-state" / WEIGHTS_FILE))
    assert max(float((a[k] - step2[k]).abs().max()) for k in a if k.startswith("text_encoder_2.")) > 0


def test_fused_backward_pass_leaves_no_gradients_to_the_loop(tiny_checkpoint, photo_dir, tmp_path, monkeypatch):
    """Each tensor is stepped inside backward: the loop must not sync (re-allocating every gradient),
    clip or step again."""
    from library.training import trainer

    def must_not_run(*_):
        raise AssertionError("the loop synced gradients under --fused_backward_pass")

    monkeypatch.setattr(trainer, "average_gradients", must_not_run)
    base = tiny_checkpoint("sd1")
    run = train("fine_tune", ft_args(base, photo_dir, tmp_path, "--max_train_steps", "2", "--cache_latents",
                                     "--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False",
                                     "scale_parameter=False", "--fused_backward_pass", "--max_grad_norm", "1.0"))
    assert run.optimizer.steps_in_backward
    assert all(p.grad is None for p in run.models.unet.parameters())
    assert max_diff(run.models.unet.state_dict(), component_states(base)["unet"]) > 0


def test_sdxl_prior_loss_weight_weights_regularisation_images(tiny_checkpoint, photo_dir, tmp_path):
    """sd-scripts' sdxl_train ignores prior_loss_weight; ours applies it."""
    from library.training.run import step_generator
    from library.training.step_loss import micro_step_loss

    run = train("sdxl", sdxl_args(tiny_checkpoint("sdxl"), photo_dir, tmp_path, "--max_train_steps", "1",
                                  "--cache_latents", "--cache_text_encoder_outputs", "--reg_data_dir",
                                  str(photo_dir / "reg"), "--prior_loss_weight", "0.25", "--train_batch_size", "1"))
    task = run.extra["task"]
    reg_batches = []
    for b in run.dataset.epoch_batches(1):
        batch = run.dataset.load_batch(b, 1, 0)
        if float(batch["loss_weights"][0]) != 1.0:
            reg_batches.append(batch)
    assert reg_batches and float(reg_batches[0]["loss_weights"][0]) == 0.25
    batch = reg_batches[0]
    with torch.no_grad():
        weighted = float(micro_step_loss(run, task, batch, step_generator(1, 0, 0, run.device)))
        batch["loss_weights"] = torch.ones_like(batch["loss_weights"])
        plain = float(micro_step_loss(run, task, batch, step_generator(1, 0, 0, run.device)))
    assert weighted == pytest.approx(0.25 * plain, rel=1e-5)


def test_sdxl_refuses_cached_text_with_trained_text_encoders(tiny_checkpoint, photo_dir, tmp_path):
    with pytest.raises(UserError, match="frozen text encoders"):
        train("sdxl", sdxl_args(tiny_checkpoint("sdxl"), photo_dir, tmp_path, "--cache_text_encoder_outputs",
                                "--train_text_encoder"))


# ---------------------------------------------------------------------------------------------
# pieces


def test_output_format_follows_sd_scripts(tmp_path):
    from library.training.task_full import format_extension, output_format

    assert output_format(None, False, "model.safetensors") == "ckpt"
    assert output_format(None, True, "model.safetensors") == "safetensors"
    assert output_format(None, False, str(tmp_path)) == "diffusers"
    assert output_format(None, True, str(tmp_path)) == "diffusers_safetensors"
    assert output_format("ckpt", True, str(tmp_path)) == "safetensors"
    assert [format_extension(f) for f in ("ckpt", "safetensors", "diffusers", "diffusers_safetensors")] == \
        [".ckpt", ".safetensors", "", ""]


def test_fused_backward_step_equals_a_plain_step():
    from transformers.optimization import Adafactor

    from library.training.task_full import FusedBackwardOptimizer

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    fused = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    fused.load_state_dict(plain.state_dict())
    kwargs = dict(lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)
    opt_plain = Adafactor(plain.parameters(), **kwargs)
    opt_fused = FusedBackwardOptimizer(Adafactor(fused.parameters(), **kwargs), max_grad_norm=0.0)
    start = plain[0].weight.detach().clone()
    x = torch.randn(5, 8)
    for _ in range(3):
        plain(x).pow(2).mean().backward()
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)
        fused(x).pow(2).mean().backward()
        assert all(p.grad is None for p in fused.parameters())  # stepped and freed during backward
        opt_fused.step()
    for a, b in zip(plain.parameters(), fused.parameters()):
        assert torch.allclose(a, b, atol=1e-7)
    assert not torch.equal(plain[0].weight, start)


def test_non_finite_weights_are_not_saved(tmp_path):
    from library.training.task_full import FullModelTask

    task = FullModelTask("db")
    task.trained = {"unet.conv_in.weight": torch.nn.Parameter(torch.tensor([1.0, float("nan")]))}
    with pytest.raises(UserError, match="unet.conv_in.weight is not finite"):
        task.save(None, str(tmp_path / "model.safetensors"), 1, 5, final=True)
    assert not (tmp_path / "model.safetensors").exists()
