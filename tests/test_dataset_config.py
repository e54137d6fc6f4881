"""Dataset config resolution/validation (dataset-config.md §1-4) and dataset sources (§4-6)."""

import argparse
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from library.data.config import check_bucket_reso_steps, load_dataset_config
from library.data.flags import add_config_arguments, add_dataset_arguments, parse_dreambooth_folder_name
from library.data.schema import CONTROLNET, DREAMBOOTH, FINETUNE
from library.data.sources import (
    ImageEntry,
    balance_reg_entries,
    collect_dataset,
    collect_entries,
    resolve_metadata_key,
    split_train_validation,
    write_info_caches,
)
from library.errors import UserError


def make_parser():
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    add_config_arguments(parser)
    # training-group flags that feed dataset values (owned by the training argument module)
    parser.add_argument("--train_batch_size", type=int, default=1)
    parser.add_argument("--prior_loss_weight", type=float, default=1.0)
    parser.add_argument("--masked_loss", action="store_true")
    parser.add_argument("--conditioning_data_dir", type=str, default=None)
    return parser


def parse(*argv):
    return make_parser().parse_args(list(argv))


def write(tmp_path, text, name="cfg.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def png(path, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size).save(path)
    return path


def load(tmp_path, text, *argv, **support):
    return load_dataset_config(write(tmp_path, text), parse(*argv), **support)


# --- the fallback chain ----------------------------------------------------------------------------

LEVELS = ["subset", "dataset", "general", "cli"]

# key, TOML values per level, CLI argv for the cli level, default (argparse default when no flag given)
SUBSET_KEYS = [
    ("shuffle_caption", {"subset": "false", "dataset": "true", "general": "false"}, ["--shuffle_caption"], False,
     {"subset": False, "dataset": True, "general": False, "cli": True}),
    ("keep_tokens", {"subset": "4", "dataset": "3", "general": "2"}, ["--keep_tokens", "1"], 0,
     {"subset": 4, "dataset": 3, "general": 2, "cli": 1}),
    ("caption_extension", {"subset": '"s"', "dataset": '".d"', "general": '".g"'}, ["--caption_extension", ".c"],
     ".caption", {"subset": ".s", "dataset": ".d", "general": ".g", "cli": ".c"}),
    ("num_repeats", {"subset": "7", "dataset": "6", "general": "5"}, ["--dataset_repeats", "4"], 1,
     {"subset": 7, "dataset": 6, "general": 5, "cli": 4}),
    ("caption_dropout_rate", {"subset": "0.4", "dataset": "0.3", "general": "0.2"}, ["--caption_dropout_rate", "0.1"],
     0.0, {"subset": 0.4, "dataset": 0.3, "general": 0.2, "cli": 0.1}),
    ("class_tokens", {"subset": '"s"', "dataset": '"d"', "general": '"g"'}, None, None,
     {"subset": "s", "dataset": "d", "general": "g"}),
]
DATASET_KEYS = [
    ("batch_size", {"dataset": "4", "general": "3"}, ["--train_batch_size", "2"], 1,
     {"dataset": 4, "general": 3, "cli": 2}),
    ("resolution", {"dataset": "[640, 384]", "general": "512"}, ["--resolution", "768,512"], None,
     {"dataset": (640, 384), "general": (512, 512), "cli": (768, 512)}),
    ("network_multiplier", {"dataset": "0.5", "general": "0.25"}, None, 1.0, {"dataset": 0.5, "general": 0.25}),
    ("enable_bucket", {"dataset": "false", "general": "true"}, ["--enable_bucket"], False,
     {"dataset": False, "general": True, "cli": True}),
]


def chain_cases(table, levels):
    for key, toml_values, argv, default, expected in table:
        for top in levels + [None]:
            if top == "cli" and argv is None or top is not None and top not in expected:
                continue
            yield pytest.param(key, toml_values, argv, default, expected, top, id=f"{key}-{top or 'default'}")


def build_chain_config(key, toml_values, argv, top, levels):
    """Set `key` at `top` and at every lower level, each with its own value."""
    active = levels[levels.index(top):] if top else []
    general = f"{key} = {toml_values['general']}" if "general" in active else ""
    dataset = f"{key} = {toml_values['dataset']}" if "dataset" in active else ""
    subset = f"{key} = {toml_values['subset']}" if "subset" in active else ""
    resolution = "" if key == "resolution" else "resolution = 512"
    text = f"""
[general]
{general}
[[datasets]]
{resolution}
{dataset}
  [[datasets.subsets]]
  image_dir = "imgs"
  {subset}
"""
    cli = argv if "cli" in active and argv else []
    return text, cli


@pytest.mark.parametrize("key, toml_values, argv, default, expected, top", list(chain_cases(SUBSET_KEYS, LEVELS)))
def test_subset_value_comes_from_the_nearest_level(tmp_path, key, toml_values, argv, default, expected, top):
    text, cli = build_chain_config(key, toml_values, argv, top, LEVELS)
    subset = load(tmp_path, text, *cli).datasets[0].subsets[0]
    assert getattr(subset, key) == (expected[top] if top else default)


@pytest.mark.parametrize("key, toml_values, argv, default, expected, top", list(chain_cases(DATASET_KEYS, LEVELS[1:])))
def test_dataset_value_comes_from_the_nearest_level(tmp_path, key, toml_values, argv, default, expected, top):
    text, cli = build_chain_config(key, toml_values, argv, top, LEVELS[1:])
    if key == "resolution" and top is None:
        with pytest.raises(UserError, match="no resolution set"):
            load(tmp_path, text, *cli)
        return
    dataset = load(tmp_path, text, *cli).datasets[0]
    assert getattr(dataset, key) == (expected[top] if top else default)


def test_values_are_resolved_per_dataset_and_subset(tmp_path):
    cfg = load(tmp_path, """
[general]
flip_aug = true
[[datasets]]
resolution = 512
keep_tokens = 2
  [[datasets.subsets]]
  image_dir = "a"
  [[datasets.subsets]]
  image_dir = "b"
  keep_tokens = 0
  flip_aug = false
[[datasets]]
resolution = [1024, 768]
  [[datasets.subsets]]
  image_dir = "a"
""")
    first, second = cfg.datasets
    assert [s.keep_tokens for s in first.subsets] == [2, 0]
    assert [s.flip_aug for s in first.subsets] == [True, False]
    assert second.subsets[0].keep_tokens == 0 and second.subsets[0].flip_aug is True
    assert second.resolution == (1024, 768)
    assert cfg.source.endswith("cfg.toml")


def test_command_line_only_values(tmp_path):
    cfg = load(tmp_path, '[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "a"',
               "--prior_loss_weight", "0.5", "--debug_dataset")
    assert cfg.general.prior_loss_weight == 0.5 and cfg.general.debug_dataset is True


def test_legacy_and_string_flags_are_converted(tmp_path):
    cfg = load(tmp_path, BASE, "--caption_extention", "txt", "--face_crop_aug_range", "2,4", "--resolution", "768,512")
    subset = cfg.datasets[0].subsets[0]
    assert (subset.caption_extension, subset.face_crop_aug_range) == (".txt", (2.0, 4.0))
    assert cfg.datasets[0].resolution == (512, 512)  # the file's value beats the flag


def test_json_config_is_accepted(tmp_path):
    path = write(tmp_path, json.dumps({"datasets": [{"resolution": 512, "subsets": [{"image_dir": "a", "keep_tokens": None}]}]}),
                 "cfg.json")
    cfg = load_dataset_config(path, parse("--keep_tokens", "3"))
    assert cfg.datasets[0].subsets[0].keep_tokens == 3  # JSON null = unset


def test_dataset_kind_detection(tmp_path):
    cfg = load(tmp_path, """
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  metadata_file = "m.json"
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "a"
  conditioning_data_dir = "c"
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "a"
""", "--masked_loss")
    assert [d.kind for d in cfg.datasets] == [FINETUNE, CONTROLNET, DREAMBOOTH]
    assert cfg.datasets[1].subsets[0].conditioning_data_dir == "c"


def test_controlnet_subsets_ignore_dreambooth_only_flags(tmp_path):
    cfg = load(tmp_path, '[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "a"\nconditioning_data_dir = "c"',
               "--alpha_mask", "--masked_loss")
    assert cfg.datasets[0].subsets[0].alpha_mask is False


def test_bucket_limits_are_rounded_to_steps(tmp_path):
    cfg = load(tmp_path, """
[[datasets]]
resolution = 512
enable_bucket = true
min_bucket_reso = 300
max_bucket_reso = 1000
  [[datasets.subsets]]
  image_dir = "a"
""")
    dataset = cfg.datasets[0]
    assert (dataset.min_bucket_reso, dataset.max_bucket_reso) == (256, 1024)
    assert any("min_bucket_reso 300 rounded to 256" in w for w in cfg.warnings)


def test_resolution_off_the_latent_grid_names_resolution_and_the_rule(tmp_path):
    """--resolution 100: without bucketing the training size, so a multiple of 8 is required; with
    bucketing only the buckets' area, which a warning spells out; min_bucket_reso above it is an error."""
    subset = '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n'
    with pytest.raises(UserError) as caught:
        load(tmp_path, subset, "--resolution", "100")
    assert str(caught.value).endswith("cfg.toml: [[datasets]] #1: resolution 100,100 (--resolution): without "
                                      "bucketing every image is trained at this size, so each side must be a multiple "
                                      "of 8 (a latent is 1/8 of the image; 64 is usual), e.g. 128,128")
    with pytest.raises(UserError, match=r"min_bucket_reso 256 \(--min_bucket_reso\) is larger than the resolution's "
                                        r"smaller side 100"):
        load(tmp_path, subset, "--resolution", "100", "--enable_bucket")
    cfg = load(tmp_path, subset, "--resolution", "100", "--enable_bucket", "--min_bucket_reso", "64")
    assert any("resolution 100,100 (--resolution) is not a multiple of bucket_reso_steps 64" in w
               and "the square bucket is 64x64" in w for w in cfg.warnings)
    assert load(tmp_path, subset, "--resolution", "768,512").datasets[0].resolution == (768, 512)


def test_bucket_reso_steps_multiple_check(tmp_path):
    cfg = load(tmp_path, '[[datasets]]\nresolution = 512\nbucket_reso_steps = 32\n[[datasets.subsets]]\nimage_dir = "a"')
    check_bucket_reso_steps(cfg, 32)
    with pytest.raises(UserError, match="bucket_reso_steps = 32 must be a multiple of 64"):
        check_bucket_reso_steps(cfg, 64)


def test_text_encoder_cache_blockers(tmp_path):
    cfg = load(tmp_path, '[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "a"\nshuffle_caption = true')
    assert cfg.text_encoder_cache_blockers() == ["shuffle_caption (dataset #1, subset #1)"]


def test_parse_dreambooth_folder_name():
    assert parse_dreambooth_folder_name("10_sks dog") == (10, "sks dog")
    assert parse_dreambooth_folder_name("3_my_cat") == (3, "my_cat")
    assert parse_dreambooth_folder_name("sks dog") is None


# --- validation errors ---------------------------------------------------------------------------------

BASE = '[[datasets]]\nresolution = 512\n  [[datasets.subsets]]\n  image_dir = "a"\n'


@pytest.mark.parametrize(
    "text, argv, support, expected",
    [
        # unknown keys, with suggestions and hints
        (BASE + '  [[datasets.subsets]]\n  image_dir = "b"\n  num_repeat = 2\n', [], {},
         r"cfg\.toml: \[\[datasets\.subsets\]\] #2 of \[\[datasets\]\] #1: unknown key 'num_repeat' \(did you mean 'num_repeats'\?\)"),
        ("[general]\nshufle_caption = true\n" + BASE, [], {},
         r"cfg\.toml: \[general\]: unknown key 'shufle_caption' \(did you mean 'shuffle_caption'\?\)"),
        ("[[dataset]]\nresolution = 512\n", [], {}, r"top level: unknown key 'dataset' \(did you mean 'datasets'\?\)"),
        (BASE + "  resolution = 768\n", [], {}, r"unknown key 'resolution'; 'resolution' is a dataset setting"),
        ('[general]\nimage_dir = "x"\n' + BASE, [], {}, r"\[general\]: unknown key 'image_dir'; 'image_dir' belongs in each"),
        ("[general]\nprior_loss_weight = 0.5\n" + BASE, [], {}, r"can only be set on the command line \(--prior_loss_weight\)"),
        ("[general]\ntrain_batch_size = 2\n" + BASE, [], {}, r"unknown key 'train_batch_size' \(did you mean 'batch_size'\?\)"),
        ('[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nmetadata_file = "m.json"\ncaption_extension = ".txt"\n', [], {},
         r"unknown key 'caption_extension'; 'caption_extension' does not apply to finetune subsets"),
        ('[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nmetadata_file = "m.json"\n', [],
         {"support_finetuning": False}, r"this trainer does not accept fine-tuning subsets"),
        (BASE + '  conditioning_data_dir = "c"\n', [], {}, r"only accepted with --masked_loss"),
        (BASE + "  caption_dropout_rate = 0.1\n", [], {"support_dropout": False}, r"caption dropout is not supported"),
        # wrong types and ranges
        ('[general]\nshuffle_caption = "yes"\n' + BASE, [], {}, r"\[general\]: 'shuffle_caption' must be true or false, got \"yes\""),
        (BASE + "  keep_tokens = 1.5\n", [], {}, r"#1 of \[\[datasets\]\] #1: 'keep_tokens' must be an integer, got 1.5"),
        (BASE + "  caption_dropout_rate = 1.5\n", [], {}, r"'caption_dropout_rate' must be at least 0.0 and at most 1.0"),
        ('[[datasets]]\nresolution = [512]\n[[datasets.subsets]]\nimage_dir = "a"\n', [], {}, r"\[\[datasets\]\] #1: 'resolution' must be"),
        (BASE + "  face_crop_aug_range = [4.0, 2.0]\n", [], {}, r"'face_crop_aug_range' must be \[low, high\]"),
        (BASE + '  caption_separator = ""\n', [], {}, r"'caption_separator' must not be empty"),
        ('[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nmetadata_file = "m.txt"\n', [], {}, r"must be a .json or .jsonl file"),
        (BASE + '  resize_interpolation = "fancy"\n', [], {}, r"'resize_interpolation' must be one of lanczos"),
        # impossible combinations and missing values
        ('[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "a"\n[[datasets.subsets]]\nmetadata_file = "m.json"\n',
         [], {}, r"\[\[datasets\]\] #1: DreamBooth subsets .* cannot be mixed"),
        ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n', [], {}, r"\[\[datasets\]\] #1: no resolution set"),
        ("[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nnum_repeats = 2\n", [], {}, r"missing required key 'image_dir'"),
        ('[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "a"\n', [], {"support_dreambooth": False},
         r"missing required key 'metadata_file'"),
        ("[[datasets]]\nresolution = 512\n", [], {}, r"no \[\[datasets.subsets\]\] defined"),
        ("[general]\nflip_aug = true\n", [], {}, r"no \[\[datasets\]\] defined"),
        ('[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "a"\nconditioning_data_dir = "c"\nrandom_crop = true\n',
         ["--masked_loss"], {}, r"random_crop is not supported for ControlNet.*set by \[\[datasets.subsets\]\] #1"),
        ('[[datasets]]\nresolution = 512\nenable_bucket = true\nmin_bucket_reso = 640\n[[datasets.subsets]]\nimage_dir = "a"\n',
         [], {}, r"min_bucket_reso 640 \(\[\[datasets\]\] #1\) is larger than the resolution's smaller side 512"),
        (BASE + "  color_aug = true\n", ["--cache_latents"], {}, r"color_aug changes the image every step"),
        # bad command-line values
        (BASE, ["--resolution", "abc"], {}, r"--resolution 'abc': expected numbers"),
        (BASE, ["--caption_dropout_rate", "2"], {}, r"--caption_dropout_rate 2.0: must be at least 0.0"),
    ],
)
def test_validation_errors(tmp_path, text, argv, support, expected):
    with pytest.raises(UserError, match=expected) as info:
        load(tmp_path, text, *argv, **support)
    assert "\n" not in str(info.value)


def test_malformed_toml_names_file_and_line(tmp_path):
    with pytest.raises(UserError, match=r"cfg\.toml: malformed TOML: .*line 3"):
        load(tmp_path, "[general]\nshuffle_caption = true\nkeep_tokens = = 2\n")


def test_malformed_json_names_file_and_line(tmp_path):
    path = write(tmp_path, '{"datasets": [\n  {"resolution": 512,,}\n]}', "cfg.json")
    with pytest.raises(UserError, match=r"cfg\.json: malformed JSON: .*line 2"):
        load_dataset_config(path, parse())


def test_missing_and_unsupported_config_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_dataset_config(tmp_path / "nope.toml", parse())
    with pytest.raises(UserError, match=r"must be a \.toml or \.json file"):
        load_dataset_config(write(tmp_path, "", "cfg.yaml"), parse())


# --- configs from the command line and DreamBooth folders -----------------------------------------------


@pytest.fixture
def db_tree(tmp_path):
    """train/10_sks dog (2 images, one captioned), train/3_my_cat (1), ignored folders, reg/1_dog (5)."""
    train = tmp_path / "train"
    png(train / "10_sks dog" / "a.png")
    png(train / "10_sks dog" / "b.jpg")
    (train / "10_sks dog" / "a.txt").write_text("a photo of sks dog, grass\nsecond line", encoding="utf-8")
    (train / "10_sks dog" / "notes.md").write_text("not an image")
    png(train / "3_my_cat" / "c.PNG")
    (train / "notes").mkdir()
    (train / "0_zero").mkdir()
    for i in range(5):
        png(tmp_path / "reg" / "1_dog" / f"r{i}.png")
    return tmp_path


def test_dreambooth_folders_from_the_command_line(db_tree):
    args = parse("--train_data_dir", str(db_tree / "train"), "--reg_data_dir", str(db_tree / "reg"),
                 "--resolution", "512", "--caption_extension", "txt")
    cfg = load_dataset_config(None, args)
    subsets = cfg.datasets[0].subsets
    assert [(Path(s.image_dir).name, s.num_repeats, s.class_tokens, s.is_reg) for s in subsets] == [
        ("10_sks dog", 10, "sks dog", False), ("3_my_cat", 3, "my_cat", False), ("1_dog", 1, "dog", True)]
    assert all(s.caption_extension == ".txt" for s in subsets)
    assert sum("ignoring folder" in w for w in cfg.warnings) == 2  # "notes" and "0_zero"

    sources = collect_entries(cfg)[0]
    by_name = {Path(e.path).name: e for e in sources.train}
    assert by_name["a.png"].caption == "a photo of sks dog, grass"
    assert by_name["b.jpg"].caption == "sks dog"  # class tokens fallback
    assert by_name["c.PNG"].caption == "my_cat"
    missing = sorted(Path(p).name for p in sources.missing_captions)
    assert missing == ["b.jpg", "c.PNG"] + [f"r{i}.png" for i in range(5)]
    assert sources.num_train_images == 10 * 2 + 3 * 1
    # 23 training samples: 5 reg images once each, then +1 per image in turn until 23
    reg = [e for e in sources.train if e.is_reg]
    assert [e.repeats for e in reg] == [5, 5, 5, 4, 4]
    assert sources.tag_frequency["10_sks dog"] == {"a photo of sks dog": 1, "grass": 1, "sks dog": 1}


def test_prior_loss_weight_and_network_multiplier_reach_the_entries(db_tree, tmp_path):
    cfg = load(tmp_path, f"""
[[datasets]]
resolution = 512
network_multiplier = 0.5
  [[datasets.subsets]]
  image_dir = "{db_tree / 'train' / '10_sks dog'}"
  [[datasets.subsets]]
  image_dir = "{db_tree / 'reg' / '1_dog'}"
  is_reg = true
""", "--prior_loss_weight", "0.25")
    entries = collect_entries(cfg)[0].train
    assert {(e.is_reg, e.loss_weight) for e in entries} == {(False, 1.0), (True, 0.25)}
    assert {e.network_multiplier for e in entries} == {0.5}


def test_reg_balancing_stops_early_when_reg_outnumbers_train():
    reg = [ImageEntry(f"r{i}.png", "", 0, 1, 2, True) for i in range(5)]
    used = balance_reg_entries(reg, 3)
    assert [(e.path, e.repeats) for e in used] == [("r0.png", 2), ("r1.png", 2)]
    assert [e.repeats for e in reg] == [2] * 5  # inputs untouched
    assert balance_reg_entries(reg, 0) == []


def test_train_data_dir_without_subfolders_explains_the_rule(tmp_path):
    png(tmp_path / "flat" / "a.png")
    with pytest.raises(UserError, match=r"no sub-folder named '<repeats>_<class tokens>'.*holds 1 files directly"):
        load_dataset_config(None, parse("--train_data_dir", str(tmp_path / "flat"), "--resolution", "512"))


def test_empty_image_dir_reports_folder_and_rule(tmp_path):
    (tmp_path / "train" / "5_empty").mkdir(parents=True)
    cfg = load_dataset_config(None, parse("--train_data_dir", str(tmp_path / "train"), "--resolution", "512"))
    with pytest.raises(UserError, match=r"no training images found in '.*5_empty'.*'<repeats>_<class tokens>'"):
        collect_entries(cfg)


def test_missing_train_data_dir(tmp_path):
    with pytest.raises(UserError, match="--train_data_dir is required"):
        load_dataset_config(None, parse("--resolution", "512"))
    with pytest.raises(UserError, match="is not a folder"):
        load_dataset_config(None, parse("--train_data_dir", str(tmp_path / "nope"), "--resolution", "512"))


def test_subsets_with_no_repeats_or_duplicates_are_ignored(db_tree, tmp_path):
    folder = db_tree / "train" / "10_sks dog"
    cfg = load(tmp_path, f"""
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "{folder}"
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = "{folder}"
  [[datasets.subsets]]
  image_dir = "{db_tree / 'train' / '3_my_cat'}"
  num_repeats = 0
""")
    sources = collect_entries(cfg)[0]
    assert [(e.subset_index, e.repeats) for e in sources.train] == [(0, 2), (0, 2)]
    assert any("already used" in w for w in sources.warnings)
    assert any("num_repeats is 0" in w for w in sources.warnings)


def test_face_crop_caption_fallback_and_wildcard_lines(tmp_path):
    folder = tmp_path / "1_x"
    png(folder / "img_10_20_30_40.png")
    (folder / "img.caption").write_text("line one\n\n  line two  \n", encoding="utf-8")
    cfg = load(tmp_path, f'[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "{folder}"\nenable_wildcard = true')
    assert collect_entries(cfg)[0].train[0].caption == "line one\nline two"


def test_caption_encoding_problems(tmp_path):
    folder = tmp_path / "1_x"
    for name in ("bom", "latin", "empty"):
        png(folder / f"{name}.png")
    (folder / "bom.caption").write_bytes("\ufeffcafé, tag".encode("utf-8"))
    (folder / "latin.caption").write_bytes("caf\xe9".encode("cp1252"))
    (folder / "empty.caption").write_bytes(b"")
    cfg = load(tmp_path, f'[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "{folder}"\nclass_tokens = "x"')

    with pytest.raises(UserError, match=r"1 file problem\(s\): .*latin\.caption: not UTF-8 \(byte 0xe9 at offset 3\)"):
        collect_entries(cfg)

    sources = collect_entries(cfg, strict=False)[0]
    captions = {Path(e.path).stem: e.caption for e in sources.train}
    assert captions == {"bom": "café, tag", "latin": "x", "empty": ""}
    kinds = {(Path(p.path).name, p.kind, p.is_error) for p in sources.problems}
    assert kinds == {("latin.caption", "not_utf8", True), ("empty.caption", "empty_caption", False)}


def test_validation_split_is_seeded_and_disjoint(tmp_path):
    folder = tmp_path / "1_x"
    for i in range(10):
        png(folder / f"{i}.png")
    cfg = load(tmp_path, f"""
[[datasets]]
resolution = 512
validation_split = 0.2
validation_seed = 7
  [[datasets.subsets]]
  image_dir = "{folder}"
  num_repeats = 3
""")
    sources = collect_entries(cfg)[0]
    train = {e.path for e in sources.train}
    val = {e.path for e in sources.validation}
    assert (len(train), len(val), train & val) == (8, 2, set())
    assert {e.repeats for e in sources.validation} == {1}
    assert sources.num_train_images == 8 * 3
    assert val == {e.path for e in collect_entries(cfg)[0].validation}  # same seed, same split


def test_split_counts_follow_ceil_and_round():
    train, val = split_train_validation(list(range(10)), 0.35, 0)
    assert (len(train), len(val)) == (7, 4)  # ceil(6.5), round(3.5) as in sd-scripts
    assert split_train_validation([1, 2], 0.0, None) == ([1, 2], [])


def test_info_cache_round_trip(tmp_path):
    folder = tmp_path / "1_x"
    png(folder / "a.png")
    (folder / "a.caption").write_text("first", encoding="utf-8")
    cfg = load(tmp_path, f'[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "{folder}"\ncache_info = true')
    sources = collect_entries(cfg)[0]
    assert list(sources.pending_info_caches) == [0]
    write_info_caches(sources, lambda path: (640, 480))
    cache = json.loads((folder / "metadata_cache.json").read_text(encoding="utf-8"))
    assert cache == {str(folder / "a.png"): {"caption": "first", "resolution": [640, 480]}}

    (folder / "a.caption").write_text("changed", encoding="utf-8")
    again = collect_entries(cfg)[0]
    assert (again.train[0].caption, again.train[0].image_size) == ("first", (640, 480))
    assert again.pending_info_caches == {}


# --- fine-tuning metadata ---------------------------------------------------------------------------


@pytest.fixture
def ft_tree(tmp_path):
    images = tmp_path / "images"
    for name in ("stem.png", "with_ext.jpg", "abs.webp"):
        png(images / name)
    png(images / "sub" / "deep.png")
    metadata = {
        "stem": {"caption": "a stem key", "tags": "t1, t2"},  # merge_captions_to_metadata.py without --full_path
        "with_ext.jpg": {"tags": "only tags", "image_size": [640, 480]},
        str(images / "abs.webp"): {"caption": "absolute key"},
        "sub/deep": {"caption": "relative stem with folder"},
    }
    (tmp_path / "meta.json").write_text(json.dumps(metadata), encoding="utf-8")
    return tmp_path


def test_metadata_keys_resolve_by_path_relative_path_and_stem(ft_tree):
    images = ft_tree / "images"
    args = parse("--in_json", str(ft_tree / "meta.json"), "--train_data_dir", str(images), "--resolution", "512",
                 "--dataset_repeats", "2")
    cfg = load_dataset_config(None, args)
    assert cfg.datasets[0].kind == FINETUNE
    sources = collect_entries(cfg)[0]
    got = {e.image_key: (Path(e.path).relative_to(images).as_posix(), e.caption, e.image_size, e.repeats)
           for e in sources.train}
    assert got == {
        "stem": ("stem.png", "a stem key,t1, t2", None, 2),
        "with_ext.jpg": ("with_ext.jpg", "only tags", (640, 480), 2),
        str(images / "abs.webp"): ("abs.webp", "absolute key", None, 2),
        "sub/deep": ("sub/deep.png", "relative stem with folder", None, 2),
    }
    assert sources.tag_frequency["meta.json"] == {"t1": 1, "t2": 1, "only tags": 1}


def test_missing_metadata_images_are_listed(ft_tree):
    meta = json.loads((ft_tree / "meta.json").read_text())
    meta["gone"] = {"caption": "x"}
    meta["blank"] = {}
    (ft_tree / "meta.json").write_text(json.dumps(meta))
    png(ft_tree / "images" / "blank.png")
    args = parse("--in_json", str(ft_tree / "meta.json"), "--train_data_dir", str(ft_tree / "images"))
    cfg = load_dataset_config(None, args)
    with pytest.raises(UserError, match=r"no image for key 'gone'"):
        collect_entries(cfg)
    sources = collect_entries(cfg, strict=False)[0]
    assert [(p.path, p.kind) for p in sources.problems] == [("gone", "missing_image")]
    assert [Path(p).name for p in sources.missing_captions] == ["blank.png"]


def test_resolve_metadata_key_prefers_image_dir(tmp_path):
    png(tmp_path / "d" / "x.png")
    assert resolve_metadata_key("x", str(tmp_path / "d")) == [str(tmp_path / "d" / "x.png")]
    assert resolve_metadata_key("x.png", str(tmp_path / "d")) == [str(tmp_path / "d" / "x.png")]
    assert resolve_metadata_key("y", str(tmp_path / "d")) == []


def test_jsonl_metadata_and_wildcard_tags(tmp_path):
    png(tmp_path / "a.png")
    lines = [json.dumps({"image_path": str(tmp_path / "a.png"), "caption": "one\ntwo", "tags": "t1\nt2"}), ""]
    (tmp_path / "m.jsonl").write_text("\n".join(lines), encoding="utf-8")
    cfg = load(tmp_path, f'[[datasets]]\n[[datasets.subsets]]\nmetadata_file = "{tmp_path / "m.jsonl"}"\nenable_wildcard = true')
    assert collect_entries(cfg)[0].train[0].caption == "one,t1,t2\ntwo,t1,t2"


def test_malformed_metadata_file(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"image_path": "a.png"}\n{broken\n', encoding="utf-8")
    cfg = load(tmp_path, f'[[datasets]]\n[[datasets.subsets]]\nmetadata_file = "{tmp_path / "m.jsonl"}"')
    with pytest.raises(UserError, match=r"m\.jsonl:2: malformed JSON line"):
        collect_entries(cfg)


# --- ControlNet / masked-loss pairs ---------------------------------------------------------------------


def controlnet_config(tmp_path):
    return load(tmp_path, f"""
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "{tmp_path / 'img'}"
  conditioning_data_dir = "{tmp_path / 'cond'}"
""", "--masked_loss")


def test_conditioning_images_pair_by_stem(tmp_path):
    png(tmp_path / "img" / "a.png")
    png(tmp_path / "img" / "b.jpg")
    png(tmp_path / "cond" / "a.webp")
    png(tmp_path / "cond" / "b.png")
    entries = collect_entries(controlnet_config(tmp_path))[0].train
    assert [(Path(e.path).name, Path(e.conditioning_path).name) for e in entries] == [("a.png", "a.webp"), ("b.jpg", "b.png")]


def test_missing_conditioning_pairs_are_one_error(tmp_path):
    png(tmp_path / "img" / "a.png")
    png(tmp_path / "img" / "b.png")
    png(tmp_path / "cond" / "a.png")
    png(tmp_path / "cond" / "z.png")
    with pytest.raises(UserError, match=r"1 image\(s\) in .* have no conditioning image: b\.png; 1 conditioning image\(s\) .* z\.png"):
        collect_entries(controlnet_config(tmp_path))


def test_controlnet_only_trainer_builds_its_subset_from_flags(tmp_path):
    args = parse("--train_data_dir", "img", "--conditioning_data_dir", "cond", "--resolution", "512", "--dataset_repeats", "5")
    cfg = load_dataset_config(None, args, support_dreambooth=False, support_finetuning=False, support_controlnet=True)
    subset = cfg.datasets[0].subsets[0]
    assert (subset.kind, subset.image_dir, subset.conditioning_data_dir, subset.num_repeats) == (CONTROLNET, "img", "cond", 1)


def test_hidden_and_non_image_files_are_skipped(tmp_path):
    folder = tmp_path / "1_x"
    png(folder / "a.png")
    png(folder / ".hidden.png")
    (folder / "a.txt").write_text("x")
    entries = collect_dataset(load(tmp_path, f'[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "{folder}"').datasets[0]).train
    assert [Path(e.path).name for e in entries] == ["a.png"]


def test_missing_image_dir_is_an_error(tmp_path):
    cfg = load(tmp_path, f'[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "typo"}"')
    with pytest.raises(UserError, match="image_dir is not a folder"):
        collect_entries(cfg)
    assert os.path.isdir(tmp_path)
