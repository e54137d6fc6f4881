"""Textual inversion end to end on tiny models: train_textual_inversion.py and the SDXL one, and the embedding files."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from library.models import embedding_files, safetensors_io
from library.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]
TOKEN = "sks"


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, write_photos):
    """A DreamBooth folder `4_subject` with four photos whose captions contain the token."""
    root = tmp_path_factory.mktemp("data")
    write_photos(str(root / "4_subject"), PHOTOS, lambda i: (64 + 32 * (i % 2), 64),
                 lambda name: f"a photo of {TOKEN} {name}")
    return str(root)


def ti_args(model, data, out, *extra, sdxl=False):
    return [
        "--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
        "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128",
        "--bucket_reso_steps", "32" if sdxl else "64", "--train_batch_size", "2", "--caption_extension", ".txt",
        "--token_string", TOKEN, "--init_word", "photo", "--num_vectors_per_token", "2", "--learning_rate", "5e-2",
        "--seed", "7", "--max_data_loader_n_workers", "0", *extra,
    ]


def parse(args, sdxl=False):
    from library.training.script_parsers import ti_parser
    from library.training.train_args import parse_args

    return parse_args(ti_parser(sdxl=sdxl, description=""), args)


def run_training(args, sdxl=False):
    from library.training.task_embedding import EmbeddingTask
    from library.training.trainer import train

    return train(parse(args, sdxl), EmbeddingTask(sdxl=sdxl))


def prepare(args, sdxl=False):
    """Everything up to the first step (model, tokens, dataset, optimizer), without training."""
    from library.training.task_embedding import EmbeddingTask
    from library.training.trainer import prepare_run

    task = EmbeddingTask(sdxl=sdxl)
    return prepare_run(parse(args, sdxl), task), task


def training_draws_loss(run, task, steps):
    """Mean loss over the exact draws the first `steps` training steps used (batches, noise, timesteps).

    A random tiny U-Net barely listens to its text, so unseen noise shows no reliable change from
    two trained vectors; on the draws it was trained on, the objective must have gone down.
    """
    from library.training.run import step_generator
    from library.training.step_loss import micro_step_loss

    per_epoch = run.steps_per_epoch
    out = []
    with torch.no_grad():
        for step in range(steps):
            epoch = step // per_epoch + 1
            batch = run.dataset.load_batch(run.dataset.epoch_batches(epoch)[step % per_epoch], epoch, step)
            out.append(float(micro_step_loss(run, task, batch, step_generator(run.seed, step, 0, run.device))))
    return sum(out) / len(out)


def assert_only_new_rows_changed(run, task, model_path, sdxl):
    """Every weight of the run's models equals the checkpoint's, bit for bit; the token tables
    grew by exactly the trained rows."""
    from library.models.loading import load_models

    fresh = load_models(model_path, sdxl=sdxl)
    for trained, base in zip(run.models.text_encoders, fresh.text_encoders):
        table = base.get_input_embeddings().weight
        embedding = trained.get_input_embeddings()
        full = embedding.weight
        assert full.shape == (table.shape[0] + 2, table.shape[1])
        assert torch.equal(full[: table.shape[0]], table)  # every old row bit-exact
        assert torch.equal(full[table.shape[0]:], embedding.new_rows.detach())
        base_state = base.state_dict()
        for name, value in trained.state_dict().items():
            if "token_embedding" not in name:
                assert torch.equal(value, base_state[name]), name
    fresh_unet = fresh.unet.state_dict()
    assert all(torch.equal(v, fresh_unet[k]) for k, v in run.models.unet.state_dict().items())
    return fresh


# ---------------------------------------------------------------------------------------------
# training


def test_sd1_embedding_trains_only_new_rows(tiny_checkpoint, photo_dir, tmp_path, fixtures_dir):
    model = tiny_checkpoint("sd1")
    out = str(tmp_path / "out")
    run = run_training(ti_args(model, photo_dir, out, "--max_train_steps", "12", "--save_model_as", "safetensors",
                               "--cache_latents"))
    task = run.extra["task"]

    # the file: sd-scripts' layout and metadata, tiny width
    path = os.path.join(out, f"{TOKEN}.safetensors")  # output_name defaults to the token string
    tensors = safetensors_io.load_tensors(path)
    fixture = json.load(open(os.path.join(fixtures_dir, "sd-scripts", "ti_sd15_2vec.keys.json")))
    assert set(tensors) == set(fixture["tensors"]) == {"emb_params"}
    assert list(tensors["emb_params"].shape) == [fixture["tensors"]["emb_params"][0][0], 32]
    assert tensors["emb_params"].dtype == torch.float32
    metadata = safetensors_io.read_metadata(path)
    assert set(fixture["metadata"]) <= set(metadata)
    for key in ("modelspec.architecture", "modelspec.implementation", "modelspec.prediction_type"):
        assert metadata[key] == fixture["metadata"][key], key
    assert metadata["modelspec.title"] == TOKEN and metadata["modelspec.resolution"] == "64x64"
    assert torch.equal(tensors["emb_params"], task.vectors[0].detach())

    # the model: only the two new rows moved, away from the init word's embedding
    fresh = assert_only_new_rows_changed(run, task, model, sdxl=False)
    photo_id = run.tokenizers[0]("photo", add_special_tokens=False).input_ids[0]
    initial = fresh.text_encoders[0].get_input_embeddings().weight[photo_id].detach().repeat(2, 1)
    assert float((tensors["emb_params"] - initial).abs().max()) > 1e-3

    # the training objective went down: same batches, noise and timesteps, trained vs initial vectors
    trained = training_draws_loss(run, task, 12)
    task.load_trainable_state({"emb_params": initial})
    before = training_draws_loss(run, task, 12)
    assert trained < before * 0.995, (trained, before)

    # our generator loads the file (token = file stem) into a fresh model with the trained rows
    from library.generation.loading import load_textual_inversion

    tokenizers = [t for t in _fresh_tokenizers(fresh.family)]
    expand = load_textual_inversion([path], fresh.family, tokenizers, fresh.text_encoders)
    assert expand(f"a {TOKEN} dog") == f"a {TOKEN} {TOKEN}1 dog"
    ids = tokenizers[0].convert_tokens_to_ids([TOKEN, f"{TOKEN}1"])
    assert torch.equal(fresh.text_encoders[0].get_input_embeddings().weight[ids], tensors["emb_params"])


def _fresh_tokenizers(family):
    from library.text.tokenizer import load_tokenizers

    return load_tokenizers(family)


def test_sdxl_embedding_trains_both_encoders(tiny_checkpoint, photo_dir, tmp_path, fixtures_dir):
    model = tiny_checkpoint("sdxl")
    out = str(tmp_path / "xl")
    run = run_training(ti_args(model, photo_dir, out, "--max_train_steps", "3", "--save_model_as", "safetensors",
                               "--output_name", "emb", sdxl=True), sdxl=True)
    task = run.extra["task"]
    path = os.path.join(out, "emb.safetensors")
    tensors = safetensors_io.load_tensors(path)
    fixture = json.load(open(os.path.join(fixtures_dir, "sd-scripts", "ti_sdxl_2vec.keys.json")))
    assert set(tensors) == set(fixture["tensors"]) == {"clip_l", "clip_g"}
    widths = [te.get_input_embeddings().embedding_dim for te in run.models.text_encoders]
    assert [list(tensors[k].shape) for k in ("clip_l", "clip_g")] == [[2, widths[0]], [2, widths[1]]]
    metadata = safetensors_io.read_metadata(path)
    assert set(fixture["metadata"]) <= set(metadata)
    assert metadata["modelspec.architecture"] == fixture["metadata"]["modelspec.architecture"]
    assert metadata["modelspec.implementation"] == fixture["metadata"]["modelspec.implementation"]
    # both tokenizers got the tokens at the same ids, both encoders' rows trained
    assert task.token_ids[0] == task.token_ids[1] == [49408, 49409]
    fresh = assert_only_new_rows_changed(run, task, model, sdxl=True)
    photo_id = run.tokenizers[0]("photo", add_special_tokens=False).input_ids[0]
    for key, base in zip(("clip_l", "clip_g"), fresh.text_encoders):
        initial = base.get_input_embeddings().weight[photo_id].detach()
        assert float((tensors[key] - initial).abs().max()) > 1e-4, key
    # A1111 and our reader see an SDXL embedding with both encoders
    vectors = embedding_files.load_embedding(path, sdxl=True, widths=widths, require_all=True)
    assert torch.equal(vectors[1], tensors["clip_g"])


def test_resume_gives_the_same_embedding(tiny_checkpoint, photo_dir, tmp_path):
    model = tiny_checkpoint("sd1")
    straight = str(tmp_path / "straight")
    run_training(ti_args(model, photo_dir, straight, "--max_train_steps", "6"))
    first = str(tmp_path / "first")
    run_training(ti_args(model, photo_dir, first, "--max_train_steps", "6", "--save_every_n_steps", "4", "--save_state"))
    state = os.path.join(first, f"{TOKEN}-step00000004-state")
    assert os.path.isdir(state) and os.path.isfile(os.path.join(first, f"{TOKEN}-step00000004.pt"))
    resumed = str(tmp_path / "resumed")
    run_training(ti_args(model, photo_dir, resumed, "--max_train_steps", "6", "--resume", state))
    # the default format is sd-scripts' .pt: {"emb_params": tensor}
    a = torch.load(os.path.join(straight, f"{TOKEN}.pt"), weights_only=True)
    b = embedding_files.load_embedding(os.path.join(resumed, f"{TOKEN}.pt"), sdxl=False, widths=[32])[0]
    assert set(a) == {"emb_params"} and type(a["emb_params"]) is torch.Tensor
    assert float((a["emb_params"] - b).abs().max()) <= 1e-6
    at_4 = embedding_files.load_embedding(os.path.join(first, f"{TOKEN}-step00000004.pt"), sdxl=False)[0]
    assert float((at_4 - b).abs().max()) > 1e-4  # steps 5 and 6 did train after the resume
    # the state's weights are themselves an embedding file, equal to the step-4 save
    in_state = embedding_files.load_embedding(os.path.join(state, "trainable.safetensors"), sdxl=False)[0]
    assert torch.equal(in_state, at_4)


# ---------------------------------------------------------------------------------------------
# set-up: tokens, captions, --weights


def test_tokens_captions_and_templates(tiny_checkpoint, photo_dir, tmp_path):
    model = tiny_checkpoint("sd1")
    run, task = prepare(ti_args(model, photo_dir, str(tmp_path / "a")))
    tokenizer = run.tokenizers[0]
    assert task.token_ids == [[49408, 49409]] and len(tokenizer) == 49410
    # T in a caption stands for all N tokens; sample prompts get the same expansion
    caption = run.dataset.caption(0, 1, 0)
    assert f"{TOKEN} {TOKEN}1 " in caption
    ids = run.dataset.load_batch(run.dataset.epoch_batches(1)[0], 1, 0)["input_ids"][0]
    assert int((ids == 49408).sum()) == int((ids == 49409).sum()) == ids.shape[0]
    assert task.prompt_replacements() == {TOKEN: f"{TOKEN} {TOKEN}1"}
    # rows start from the init word, in the run's train dtype
    photo = tokenizer("photo", add_special_tokens=False).input_ids[0]
    table = task.embeddings[0].base.weight
    assert torch.equal(task.vectors[0].detach(), table[photo].repeat(2, 1))

    run, task = prepare(ti_args(model, photo_dir, str(tmp_path / "b"), "--use_style_template"))
    captions = {run.dataset.caption(i, 1, step) for i in range(len(run.dataset)) for step in range(5)}
    assert all(c.endswith(f"style of {TOKEN} {TOKEN}1") for c in captions) and len(captions) > 1


def test_captions_without_the_token_are_named(tiny_checkpoint, photo_dir, tmp_path):
    model = tiny_checkpoint("sd1")
    data = tmp_path / "data"
    folder = data / "1_x"
    folder.mkdir(parents=True)
    for i, name in enumerate(PHOTOS):
        Image.new("RGB", (64, 64), (40 * i, 90, 160)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text("a photo of sks" if i == 0 else f"a photo of {name}", encoding="utf-8")
    with pytest.raises(UserError, match=r"3 caption\(s\) do not contain the token string 'sks'.*chelsea.png"):
        prepare(ti_args(model, str(data), str(tmp_path / "o")))
    # found before any model loads: a missing model file is not what stops the run
    with pytest.raises(UserError, match="do not contain the token string"):
        prepare(ti_args(str(tmp_path / "not-there.safetensors"), str(data), str(tmp_path / "o")))
    # templates replace the captions, so none needs the token
    run, _ = prepare(ti_args(model, str(data), str(tmp_path / "o"), "--use_object_template"))
    assert run.dataset.caption(1, 1, 0) != "a photo of chelsea"
    with pytest.raises(UserError, match="already knows"):
        prepare(ti_args(model, photo_dir, str(tmp_path / "o"), "--token_string", "a"))


def test_weights_start_the_vectors_and_must_fit(tiny_checkpoint, photo_dir, tmp_path, fixtures_dir):
    model = tiny_checkpoint("sd1")
    start = torch.randn(2, 32)
    weights = str(tmp_path / "start.pt")
    embedding_files.save_embedding(weights, [start], sdxl=False, style="a1111")
    _, task = prepare(ti_args(model, photo_dir, str(tmp_path / "o"), "--weights", weights))
    assert torch.equal(task.vectors[0].detach(), start)

    with pytest.raises(UserError, match="holds 2 vector"):
        prepare(ti_args(model, photo_dir, str(tmp_path / "o"), "--weights", weights, "--num_vectors_per_token", "3"))
    real = os.path.join(fixtures_dir, "sd-scripts", "ti_sd15_2vec.safetensors")
    with pytest.raises(UserError, match=r"ti_sd15_2vec\.safetensors: its vectors are 768 wide.*32-wide"):
        prepare(ti_args(model, photo_dir, str(tmp_path / "o"), "--weights", real))


def test_script_rejects_bad_flags(tmp_path):
    from library.training.task_embedding import EmbeddingTask

    base = ["--output_dir", str(tmp_path), "--token_string", TOKEN]
    for extra, message in ((["--use_object_template", "--use_style_template"], "exclude each other"),
                           (["--caption_dropout_rate", "0.1"], "caption dropout"),
                           (["--num_vectors_per_token", "0"], "1 or more")):
        with pytest.raises(UserError, match=message):
            EmbeddingTask(sdxl=False).validate_args(parse(base + extra))
    with pytest.raises(UserError, match="--token_string is required"):
        EmbeddingTask(sdxl=False).validate_args(parse(["--output_dir", str(tmp_path)]))
    with pytest.raises(UserError, match="cache_text_encoder_outputs"):
        EmbeddingTask(sdxl=True).validate_args(parse(base + ["--cache_text_encoder_outputs"], sdxl=True))
    args = parse(base)
    task = EmbeddingTask(sdxl=False)
    task.validate_args(args)
    assert args.output_name == TOKEN and task.artifact_ext == ".pt" and args.save_model_as == "pt"


def test_parser_stays_torch_free():
    code = ("import sys; from library.training.script_parsers import ti_parser; p = ti_parser(True, ''); "
            "a = p.parse_args(['--token_string', 'x', '--weights', 'w.pt']); "
            "assert a.num_vectors_per_token == 1 and a.save_model_as == 'pt' and not a.use_style_template; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # the script reports a missing token as a one-line error, exit status 2, before loading anything
    script = os.path.join(ROOT, "sdxl_train_textual_inversion.py")
    result = subprocess.run([sys.executable, script, "--output_dir", "out"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: --token_string is required"), result.stderr


# ---------------------------------------------------------------------------------------------
# the embedding module and the files


def test_new_rows_embedding_trains_only_its_rows():
    from library.training.task_embedding import NewRowsEmbedding

    base = torch.nn.Embedding(10, 4)
    base.requires_grad_(False)
    original = base.weight.clone()
    rows = torch.randn(2, 4)
    embedding = NewRowsEmbedding(base, rows.clone())
    ids = torch.tensor([[0, 10, 3, 11, 10]])
    out = embedding(ids)
    assert torch.equal(out, torch.nn.functional.embedding(ids, torch.cat([original, rows])))
    out.sum().backward()
    assert torch.equal(embedding.new_rows.grad, torch.tensor([[2.0] * 4, [1.0] * 4]))
    assert base.weight.grad is None and embedding.num_embeddings == 12
    assert [n for n, p in embedding.named_parameters() if p.requires_grad] == ["new_rows"]


def test_real_fixture_embedding_reads(fixtures_dir):
    path = os.path.join(fixtures_dir, "sd-scripts", "ti_sd15_2vec.safetensors")
    (vectors,) = embedding_files.load_embedding(path, sdxl=False, widths=[768])
    assert vectors.shape == (2, 768) and vectors.dtype == torch.float32 and torch.isfinite(vectors).all()
    with pytest.raises(UserError, match="not an SDXL embedding"):
        embedding_files.load_embedding(path, sdxl=True)


def test_file_formats_round_trip(tmp_path):
    e = torch.randn(3, 8)
    for ext in (".pt", ".ckpt", ".safetensors"):
        path = str(tmp_path / f"ours{ext}")
        embedding_files.save_embedding(path, [torch.nn.Parameter(e.clone())], sdxl=False,
                                       metadata={"modelspec.title": "t"})
        assert torch.equal(embedding_files.load_embedding(path, sdxl=False, widths=[8])[0], e)
    raw = torch.load(str(tmp_path / "ours.pt"), weights_only=True)
    assert list(raw) == ["emb_params"] and type(raw["emb_params"]) is torch.Tensor  # A1111's one-tensor case
    assert safetensors_io.read_metadata(str(tmp_path / "ours.safetensors")) == {"modelspec.title": "t"}

    # A1111's own dict, written and read back; its fields as A1111 writes them
    path = str(tmp_path / "a1111.pt")
    embedding_files.save_embedding(path, [e], sdxl=False, style="a1111", step=120)
    raw = torch.load(path, weights_only=True)
    assert raw["name"] == "a1111" and raw["step"] == 120 and raw["string_to_token"] == {"*": 265}
    assert torch.equal(embedding_files.load_embedding(path, sdxl=False)[0], e)
    # old A1111 files hold a torch ParameterDict; diffusers' learned_embeds a 1-D vector per token
    old = str(tmp_path / "old.pt")
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(e.clone())}), "step": 3}, old)
    assert torch.equal(embedding_files.load_embedding(old, sdxl=False)[0], e)
    learned = str(tmp_path / "learned_embeds.bin")
    torch.save({"<cat-toy>": e[0]}, learned)
    assert embedding_files.load_embedding(learned, sdxl=False)[0].shape == (1, 8)

    # SDXL: both keys, and either alone for --weights
    xl = str(tmp_path / "xl.safetensors")
    embedding_files.save_embedding(xl, [e, torch.randn(3, 16)], sdxl=True, dtype=torch.float16)
    l_vec, g_vec = embedding_files.load_embedding(xl, sdxl=True, widths=[8, 16])
    assert l_vec.dtype == torch.float16 and g_vec.shape == (3, 16)
    only_g = str(tmp_path / "g.safetensors")
    safetensors_io.save_tensors({"clip_g": g_vec}, only_g)
    assert embedding_files.load_embedding(only_g, sdxl=True)[0] is None
    with pytest.raises(UserError, match="clip_l and clip_g"):
        embedding_files.load_embedding(only_g, sdxl=True, require_all=True)
    with pytest.raises(UserError, match="SDXL embedding"):
        embedding_files.load_embedding(xl, sdxl=False)
    with pytest.raises(UserError, match=r"A1111's string_to_param layout"):
        embedding_files.save_embedding(str(tmp_path / "x.pt"), [e, e], sdxl=True, style="a1111")


def test_unsafe_or_broken_files_are_refused(tmp_path):
    unsafe = str(tmp_path / "unsafe.pt")
    torch.save({"emb_params": torch.zeros(1, 4), "object": Image.new("RGB", (1, 1))}, unsafe)
    with pytest.raises(UserError, match="unsafe.pt: refused to load"):
        embedding_files.read_tensors(unsafe)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(UserError, match="broken.safetensors"):
        embedding_files.read_tensors(str(broken))
    with pytest.raises(UserError, match="not found"):
        embedding_files.read_tensors(str(tmp_path / "missing.pt"))
