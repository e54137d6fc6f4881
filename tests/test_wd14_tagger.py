"""finetune/tag_images_by_wd14_tagger.py on tiny ONNX models built here with the `onnx` package.

The test model follows the WD14 convention (input `[N, 448, 448, 3]` float32 BGR 0..255, output one
probability per row of selected_tags.csv) and scores each tag as a linear function of the image's
mean blue, green and red (b, g, r in 0..1). Solid-colour images therefore have tags known in
advance, and every expected caption below is written out by hand from the TAGS table:

    red image   (b, g, r) = (0, 0, 1): ratings general .25 sensitive .70; 1girl .9, solo .6,
                red_theme 1, long_hair .4, ^_^ .5, kagamine_rin_(vocaloid) .8
    green image (0, 1, 0): ratings general .75 sensitive .2; 1girl, solo, green_theme, long_hair, ^_^,
                hatsune_miku_(vocaloid) .8
    yellow      (0, 1, 1): both characters .8, rating general .75 sensitive .7

A red image read as RGB instead of BGR would come out as blue_theme and megurine_luka.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from library.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = "finetune/tag_images_by_wd14_tagger.py"

# (name, category, constant, weight of b, g, r)
TAGS = [
    ("general", "9", 0.25, (0, 0.5, 0)),
    ("sensitive", "9", 0.2, (0, 0, 0.5)),
    ("questionable", "9", 0.1, (0, 0, 0)),
    ("explicit", "9", 0.05, (0, 0, 0)),
    ("1girl", "0", 0.9, (0, 0, 0)),
    ("solo", "0", 0.6, (0, 0, 0)),
    ("red_theme", "0", 0.0, (0, 0, 1)),
    ("green_theme", "0", 0.0, (0, 1, 0)),
    ("blue_theme", "0", 0.0, (1, 0, 0)),
    ("long_hair", "0", 0.4, (0, 0, 0)),
    ("^_^", "0", 0.5, (0, 0, 0)),
    ("kagamine_rin_(vocaloid)", "4", 0.0, (0, 0, 0.8)),
    ("hatsune_miku_(vocaloid)", "4", 0.0, (0, 0.8, 0)),
    ("megurine_luka", "4", 0.0, (0.8, 0, 0)),
]
RED = "1girl, solo, red_theme, long_hair, ^_^, kagamine_rin_(vocaloid)"
GREEN = "1girl, solo, green_theme, long_hair, ^_^, hatsune_miku_(vocaloid)"
YELLOW = "1girl, solo, red_theme, green_theme, long_hair, ^_^, kagamine_rin_(vocaloid), hatsune_miku_(vocaloid)"
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "yellow": (255, 255, 0)}


def linear_tagger(path, constants, weights, *, nchw=False, batch="batch", input_name="input_1"):
    """An ONNX model: scores = constants + weights · mean(b, g, r) of the image (0..1)."""
    if nchw:  # tag-mapping convention: [N, 3, 448, 448], x / 127.5 - 1
        shape, axes = [batch, 3, 448, 448], [2, 3]
        nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=axes, keepdims=0),
                 helper.make_node("Add", ["m", "one"], ["m1"]), helper.make_node("Mul", ["m1", "half"], ["bgr"])]
        extra = [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
                 numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    else:
        shape, axes = [batch, 448, 448, 3], [1, 2]
        nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=axes, keepdims=0),
                 helper.make_node("Mul", ["m", "scale"], ["bgr"])]
        extra = [numpy_helper.from_array(np.array(1 / 255, np.float32), "scale")]
    nodes += [helper.make_node("MatMul", ["bgr", "w"], ["wx"]), helper.make_node("Add", ["wx", "c"], ["y"])]
    inits = extra + [numpy_helper.from_array(np.asarray(weights, np.float32).T.copy(), "w"),
                     numpy_helper.from_array(np.asarray(constants, np.float32), "c")]
    graph = helper.make_graph(
        nodes, "tagger", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, len(constants)])], inits)
    graph.input[0].name = input_name
    for node in graph.node:
        node.input[:] = [input_name if name == "x" else name for name in node.input]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def write_wd14_model(folder, batch="batch", tags=TAGS):
    folder.mkdir(parents=True, exist_ok=True)
    linear_tagger(folder / "model.onnx", [t[2] for t in tags], [t[3] for t in tags], batch=batch)
    lines = ["tag_id,name,category,count"] + [f"{i},{name},{cat},100" for i, (name, cat, _, _) in enumerate(tags)]
    (folder / "selected_tags.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_wd14_model(root / "SmilingWolf_wd-v1-4-convnext-tagger-v2")
    return root


def solid(path, colour, size=(64, 64), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "img"
    for name, colour in COLOURS.items():
        solid(folder / f"{name}.png", colour)
    return folder


def load_script(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TAGGER = load_script(SCRIPT)


def tag(folder, model_dir, *flags):
    return TAGGER.main([str(folder), "--model_dir", str(model_dir), "--onnx", *map(str, flags)])


def caption(folder, name, ext=".txt"):
    return (folder / f"{name}{ext}").read_text(encoding="utf-8")


def test_default_tags_follow_the_model_and_csv_order(images, model_dir):
    assert tag(images, model_dir) == 0
    assert caption(images, "red") == RED + "\n"
    assert caption(images, "green") == GREEN + "\n"
    assert caption(images, "yellow") == YELLOW + "\n"


@pytest.mark.parametrize("flags, expected", [
    (["--general_threshold", "0.45"], "1girl, solo, red_theme, ^_^, kagamine_rin_(vocaloid)"),
    (["--thresh", "0.55"], "1girl, solo, red_theme, kagamine_rin_(vocaloid)"),
    (["--thresh", "0.55", "--character_threshold", "0.85"], "1girl, solo, red_theme"),
    (["--remove_underscore"], "1girl, solo, red theme, long hair, ^_^, kagamine rin (vocaloid)"),
    (["--character_tag_expand"], "1girl, solo, red_theme, long_hair, ^_^, kagamine_rin, vocaloid"),
    (["--character_tag_expand", "--remove_underscore"], "1girl, solo, red theme, long hair, ^_^, kagamine rin, vocaloid"),
    (["--character_tags_first"], "kagamine_rin_(vocaloid), 1girl, solo, red_theme, long_hair, ^_^"),
    (["--use_rating_tags"], "sensitive, " + RED),
    (["--use_rating_tags_as_last_tag"], RED + ", sensitive"),
    (["--use_rating_tags", "--use_rating_tags_as_last_tag"], RED + ", sensitive"),
    (["--undesired_tags", "solo,  long_hair ,sensitive", "--use_rating_tags"],
     "1girl, red_theme, ^_^, kagamine_rin_(vocaloid)"),
    (["--always_first_tags", "red_theme, ^_^, absent"], "red_theme, ^_^, 1girl, solo, long_hair, kagamine_rin_(vocaloid)"),
    (["--caption_separator", ","], RED.replace(", ", ",")),
    (["--caption_separator", " | ", "--undesired_tags", "solo | 1girl"], "red_theme | long_hair | ^_^ | kagamine_rin_(vocaloid)"),
    (["--tag_replacement", "1girl,1woman;red_theme, red\\;theme ;kagamine_rin_(vocaloid),rin"],
     "1woman, solo, red;theme, long_hair, ^_^, rin"),
    (["--remove_underscore", "--tag_replacement", "long hair,very long hair"],
     "1girl, solo, red theme, very long hair, ^_^, kagamine rin (vocaloid)"),
])
def test_each_option_on_the_red_image(images, model_dir, flags, expected):
    assert tag(images, model_dir, *flags) == 0
    assert caption(images, "red") == expected + "\n"


def test_two_characters_keep_their_order_and_expansion_dedups_the_series(images, model_dir):
    assert tag(images, model_dir, "--character_tags_first", "--character_tag_expand", "--use_rating_tags") == 0
    # sd-scripts put several characters in reverse order and repeated the series.
    assert caption(images, "yellow") == ("general, kagamine_rin, vocaloid, hatsune_miku, 1girl, solo, red_theme, "
                                         "green_theme, long_hair, ^_^\n")
    assert tag(images, model_dir, "--character_tag_expand", "--undesired_tags", "vocaloid") == 0
    assert caption(images, "yellow") == "1girl, solo, red_theme, green_theme, long_hair, ^_^, kagamine_rin, hatsune_miku\n"


def test_padding_is_white_and_alpha_is_composited_on_white(tmp_path, model_dir):
    folder = tmp_path / "img"
    # 64x32 red, padded to 64x64 with white: (b, g, r) = (.5, .5, 1)
    solid(folder / "wide.png", (255, 0, 0), size=(64, 32))
    # fully transparent red: white after compositing, (1, 1, 1)
    solid(folder / "clear.png", (255, 0, 0, 0), mode="RGBA")
    assert tag(folder, model_dir, "--use_rating_tags") == 0
    assert caption(folder, "wide") == ("sensitive, 1girl, solo, red_theme, green_theme, blue_theme, long_hair, ^_^, "
                                       "kagamine_rin_(vocaloid), hatsune_miku_(vocaloid), megurine_luka\n")
    assert caption(folder, "clear") == ("general, 1girl, solo, red_theme, green_theme, blue_theme, long_hair, ^_^, "
                                        "kagamine_rin_(vocaloid), hatsune_miku_(vocaloid), megurine_luka\n")


def test_append_keeps_existing_tags_and_adds_only_new_ones(images, model_dir):
    (images / "red.txt").write_text("\ufeffmy_tag, 1girl ,solo\n\n", encoding="utf-8")
    (images / "green.txt").write_bytes(b"caf\xe9")  # not UTF-8: left alone, reported
    assert tag(images, model_dir, "--append_tags") == 1
    assert caption(images, "red") == "my_tag, 1girl, solo, red_theme, long_hair, ^_^, kagamine_rin_(vocaloid)\n"
    assert (images / "green.txt").read_bytes() == b"caf\xe9"
    assert caption(images, "yellow") == YELLOW + "\n"
    # without --append_tags the file is replaced
    assert tag(images, model_dir) == 0
    assert caption(images, "red") == RED + "\n"


def test_recursive_extension_and_output_files(images, model_dir, tmp_path):
    solid(images / "sub" / "deep.jpg", (0, 255, 0))
    assert tag(images, model_dir, "--caption_extention", "tags") == 0
    assert caption(images, "red", ".tags") == RED + "\n"
    assert not (images / "sub" / "deep.tags").exists()
    assert tag(images, model_dir, "--recursive", "--caption_extension", ".tags") == 0
    assert caption(images / "sub", "deep", ".tags") == GREEN + "\n"

    out = tmp_path / "tags.json"
    assert tag(images, model_dir, "--output_path", out) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data == {str(images / f"{name}.png"): {"tags": text, "image_size": [64, 64]}
                    for name, text in (("green", GREEN), ("red", RED), ("yellow", YELLOW))}
    out = tmp_path / "tags.jsonl"
    assert tag(images, model_dir, "--output_path", out, "--recursive") == 0
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(line["image_path"], line["caption"], line["image_size"]) for line in lines] == [
        (str(images / "green.png"), GREEN, [64, 64]), (str(images / "red.png"), RED, [64, 64]),
        (str(images / "sub" / "deep.jpg"), GREEN, [64, 64]), (str(images / "yellow.png"), YELLOW, [64, 64])]


def test_frequencies_and_debug(images, model_dir, capsys, caplog):
    caplog.set_level("INFO")
    assert tag(images, model_dir, "--frequency_tags", "--use_rating_tags", "--debug") == 0
    out = capsys.readouterr().out
    report = out[out.index("Tag frequencies:"):].splitlines()[1:]
    assert report == ["1girl: 3", "^_^: 3", "long_hair: 3", "solo: 3", "general: 2", "green_theme: 2",
                      "hatsune_miku_(vocaloid): 2", "kagamine_rin_(vocaloid): 2", "red_theme: 2", "sensitive: 1"]
    assert any("red.png: general: 1girl, solo, red_theme, long_hair, ^_^ | character: kagamine_rin_(vocaloid) | "
               "rating: sensitive" in r.message for r in caplog.records)


def test_corrupt_image_is_skipped_and_the_rest_tagged(images, model_dir, capsys, caplog):
    (images / "broken.png").write_bytes((images / "red.png").read_bytes()[:60])
    (images / "empty.jpg").write_bytes(b"")
    for workers in (None, 2):
        flags = ["--batch_size", "2"] + (["--max_data_loader_n_workers", str(workers)] if workers else [])
        for name in COLOURS:
            (images / f"{name}.txt").unlink(missing_ok=True)
        assert tag(images, model_dir, *flags) == 1
        assert [caption(images, n) for n in COLOURS] == [RED + "\n", GREEN + "\n", YELLOW + "\n"]
        err = capsys.readouterr().err
        assert "skipped: " + str(images / "broken.png") in err and "empty.jpg: empty file" in err
        assert "2 of 5 images could not be read" in caplog.text
        caplog.clear()
        assert not (images / "broken.txt").exists()


def test_fixed_batch_models_and_workers_give_the_same_tags(tmp_path, images):
    root = tmp_path / "models"
    write_wd14_model(root / "SmilingWolf_wd-v1-4-convnext-tagger-v2", batch=2)  # 3 images: last batch padded
    assert tag(images, root, "--batch_size", "8", "--max_data_loader_n_workers", "2") == 0
    assert [caption(images, n) for n in COLOURS] == [RED + "\n", GREEN + "\n", YELLOW + "\n"]


def test_tag_mapping_layout(tmp_path, images):
    """owner/name/sub: model_optimized.onnx returning logits, tag_mapping.json; tags by probability."""
    folder = tmp_path / "models" / "Nonene_cl_tagger" / "cl_tagger_1_01"
    folder.mkdir(parents=True)
    # (id, tag, category, logit constant, logit weights of b, g, r); id 3 is unused
    spec = [(0, "general", "Rating", 0.0, (0, 2, 0)), (1, "sensitive", "Rating", 0.0, (0, 0, 3)),
            (2, "best_quality", "Quality", 1.0, (0, 0, 0)), (4, "1girl", "General", 1.0, (0, 0, 0)),
            (5, "solo", "General", 2.0, (0, 0, 0)), (6, "red_theme", "General", -5.0, (0, 0, 10)),
            (7, "kagamine_rin_(vocaloid)", "Character", -3.0, (0, 0, 6)), (8, "vocaloid", "Copyright", 1.5, (0, 0, 0)),
            (9, "highres", "Meta", -1.0, (0, 0, 0)), (10, "pixiv", "Artist", 0.5, (0, 0, 0))]
    constants, weights = np.full(11, -9.0), np.zeros((11, 3))
    for i, _, _, c, w in spec:
        constants[i], weights[i] = c, w
    linear_tagger(folder / "model_optimized.onnx", constants, weights, nchw=True, input_name="input")
    (folder / "tag_mapping.json").write_text(json.dumps(
        {str(i): {"tag": name, "category": cat} for i, name, cat, _, _ in spec}), encoding="utf-8")
    flags = ["--repo_id", "Nonene/cl_tagger/cl_tagger_1_01"]
    # red: sigmoid of red_theme 5 (.993), kagamine 3 (.95), solo 2 (.88), vocaloid 1.5 (.82), 1girl 1 (.73),
    # pixiv .5 (.62); highres -1 (.27) is under .35; rating sensitive (3 > 0), quality best_quality
    assert tag(images, tmp_path / "models", *flags) == 0
    assert caption(images, "red") == "red_theme, kagamine_rin_(vocaloid), solo, vocaloid, 1girl, pixiv\n"
    assert tag(images, tmp_path / "models", *flags, "--use_rating_tags", "--use_quality_tags_as_last_tag",
               "--character_tags_first", "--meta_threshold", "0.2", "--artist_threshold", "0.7",
               "--copyright_threshold", "0.9", "--character_tag_expand") == 0
    assert caption(images, "red") == "sensitive, kagamine_rin, vocaloid, red_theme, solo, 1girl, highres, best_quality\n"
    assert caption(images, "green") == "general, solo, 1girl, highres, best_quality\n"


def run_tool(*args, env=None):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, **(env or {})))


def test_missing_model_and_refused_download_are_one_line(images, tmp_path, model_dir):
    r = run_tool(images, "--model_dir", tmp_path / "none")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    folder = tmp_path / "none" / "SmilingWolf_wd-v1-4-convnext-tagger-v2"
    assert r.stderr.startswith(f"error: tagger model not found: {folder} lacks model.onnx and selected_tags.csv; "
                               f"download them with `hf download SmilingWolf/wd-v1-4-convnext-tagger-v2 model.onnx "
                               f"selected_tags.csv --local-dir {folder}`")
    with pytest.raises(UserError, match="^--force_download: models are not downloaded"):
        tag(images, model_dir, "--force_download")
    with pytest.raises(UserError, match="^--append_tags adds to caption files, and --output_path writes no caption"):
        tag(images, model_dir, "--output_path", tmp_path / "x.json", "--append_tags")
    assert not list(images.glob("*.txt"))


def test_bad_options_and_mismatched_files_stop_before_any_work(images, model_dir, tmp_path):
    with pytest.raises(UserError, match="--tag_replacement: 'a' is not `source,target`"):
        tag(images, model_dir, "--tag_replacement", "a")
    with pytest.raises(UserError, match="--general_threshold 1.5: a threshold is a probability"):
        tag(images, model_dir, "--general_threshold", "1.5")
    with pytest.raises(UserError, match="--caption_separator ' ' has no visible character"):
        tag(images, model_dir, "--caption_separator", " ")
    other = tmp_path / "other" / "SmilingWolf_wd-v1-4-convnext-tagger-v2"
    write_wd14_model(other)
    (other / "selected_tags.csv").write_text("tag_id,name,category,count\n0,a,0,1\n", encoding="utf-8")
    with pytest.raises(UserError, match="the model has 14 outputs but .*selected_tags.csv lists 1 tags"):
        tag(images, tmp_path / "other")
    assert not list(images.glob("*.txt"))


def test_model_dir_may_hold_the_files_directly(images, model_dir):
    assert tag(images, model_dir / "SmilingWolf_wd-v1-4-convnext-tagger-v2") == 0
    assert caption(images, "red") == RED + "\n"


def test_options_a_model_cannot_use_are_reported(images, model_dir, tmp_path, caplog):
    assert tag(images, model_dir, "--meta_threshold", "0.5", "--use_quality_tags") == 0
    assert caption(images, "red") == RED + "\n"
    assert "--meta_threshold: " in caplog.text and "has no meta tags; the option changes nothing" in caplog.text
    assert "--use_quality_tags: " in caplog.text and "has no quality tags" in caplog.text
    keras = tmp_path / "keras" / "SmilingWolf_wd-v1-4-convnext-tagger-v2"
    keras.mkdir(parents=True)
    (keras / "saved_model.pb").write_bytes(b"")
    with pytest.raises(UserError, match="holds the TensorFlow model; the tagger runs the ONNX one"):
        tag(images, tmp_path / "keras")
