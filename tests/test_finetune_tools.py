"""The fine-tuning metadata tools: merging caption/tag files into metadata JSON and cleaning it.

Runs the scripts as a user does (subprocesses, exit codes, messages) on a small tree of real
images, and calls `library.data.metadata_json` directly for the cleanup rules and atomic writing.
"""

import importlib.util
import json
import os
import stat
import subprocess
import sys

import pytest
from PIL import Image

from library.data import metadata_json
from library.data.sources import metadata_caption, resolve_metadata_key
from library.errors import UserError
from library.data.metadata_json import clean_caption, clean_tags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = "finetune/merge_captions_to_metadata.py"
TAGS = "finetune/merge_dd_tags_to_metadata.py"
CLEAN = "finetune/clean_captions_and_tags.py"


def run_tool(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)


def load_script(path):
    """An entry script as a module, to call its main(argv) in-process (errors raise UserError)."""
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_image(path, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (200, 10, 10)).save(path, format=fmt)


@pytest.fixture
def tree(tmp_path):
    """img/ with: a.png (unicode caption with BOM and CRLF), b.jpg (Latin-1 caption), c.PNG (no
    caption), e.webp (caption), sub/d.png (caption, only seen with --recursive), .hidden.png and
    .cache/x.png (never used). Tag files (.txt) for a and d."""
    img = tmp_path / "img"
    for name, fmt in [("a.png", "PNG"), ("b.jpg", "JPEG"), ("c.PNG", "PNG"), ("e.webp", "WEBP"),
                      ("sub/d.png", "PNG"), (".hidden.png", "PNG"), (".cache/x.png", "PNG")]:
        make_image(img / name, fmt)
    (img / "a.caption").write_bytes("\ufeff  café girl ☕, 桜 \r\nsecond line\r\n".encode("utf-8"))
    (img / "b.caption").write_bytes("caf\xe9".encode("latin-1"))
    (img / "e.caption").write_text("plain", encoding="utf-8")
    (img / "sub" / "d.caption").write_text("deep", encoding="utf-8")
    (img / ".hidden.caption").write_text("hidden", encoding="utf-8")
    (img / ".cache" / "x.caption").write_text("cached copy", encoding="utf-8")
    (img / "a.txt").write_text("long_hair, blue_eyes", encoding="utf-8")
    (img / "sub" / "d.txt").write_text("short_hair", encoding="utf-8")
    return img


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_merge_captions_stem_keys(tree, tmp_path):
    out = tmp_path / "meta.json"
    r = run_tool(CAPTIONS, tree, out)
    # b.caption is not UTF-8: reported, skipped, output still written, exit 1.
    assert r.returncode == 1, r.stderr
    assert read_json(out) == {"a": {"caption": "café girl ☕, 桜 \nsecond line"},
                              "e": {"caption": "plain"}}
    assert "b.caption: not UTF-8 (byte 0xe9 at offset 3)" in r.stderr
    assert "1 image without a .caption file" in r.stderr and "c.PNG" in r.stderr
    assert "Traceback" not in r.stderr
    text = out.read_text(encoding="utf-8")
    assert "café" in text and "\\u" not in text  # ensure_ascii=False
    assert text.startswith('{\n  "a": {\n    "caption"')  # indent 2


def test_caption_text_is_stripped_but_inner_lines_kept(tmp_path):
    path = tmp_path / "x.caption"
    path.write_bytes(b"\xef\xbb\xbf  one \r\n two\r\n\r\n")
    assert metadata_json.read_text_file(str(path)) == ("one \n two", None)
    path.write_bytes(b"\xff\xfeh\x00i\x00")  # UTF-16 is not guessed
    text, problem = metadata_json.read_text_file(str(path))
    assert text is None and problem.startswith("not UTF-8 (byte 0xff at offset 0)")


def test_merge_tags_full_path_recursive(tree, tmp_path):
    out = tmp_path / "tags.json"
    r = run_tool(TAGS, tree, out, "--full_path", "--recursive", "--debug")
    assert r.returncode == 0, r.stderr
    a, d = str(tree / "a.png"), str(tree / "sub" / "d.png")
    assert read_json(out) == {a: {"tags": "long_hair, blue_eyes"}, d: {"tags": "short_hair"}}
    assert all(os.path.isabs(k) for k in read_json(out))
    assert f"{a} long_hair, blue_eyes" in r.stderr  # --debug
    assert "3 images without a .txt file" in r.stderr  # b, c, e; hidden files are not images here
    assert ".hidden" not in r.stderr and ".cache" not in r.stderr


def test_recursive_needs_full_path(tree, tmp_path):
    r = run_tool(TAGS, tree, tmp_path / "x.json", "--recursive")
    assert r.returncode == 2
    assert r.stderr.startswith("error: --recursive needs --full_path") and r.stderr.count("\n") == 1
    assert not (tmp_path / "x.json").exists()


def test_bad_inputs(tree, tmp_path):
    main = load_script(CAPTIONS).main
    with pytest.raises(UserError, match="train_data_dir .*nope.* is not a folder"):
        main([str(tmp_path / "nope"), str(tmp_path / "x.json")])
    with pytest.raises(UserError, match="--in_json .*missing.json.* not found"):
        main([str(tree), str(tmp_path / "x.json"), "--in_json", str(tmp_path / "missing.json")])
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": ', encoding="utf-8")
    with pytest.raises(UserError, match="bad.json: malformed JSON"):
        main([str(tree), str(tmp_path / "x.json"), "--in_json", str(bad)])
    with pytest.raises(UserError, match="no_dir.* does not exist"):
        main([str(tree), str(tmp_path / "no_dir" / "x.json")])
    with pytest.raises(UserError, match="--caption_extension is empty"):
        main([str(tree), str(tmp_path / "x.json"), "--caption_extension", ""])
    assert not (tmp_path / "x.json").exists()


def test_in_json_entries_are_preserved(tree, tmp_path):
    in_json = tmp_path / "in.json"
    original = {"a": {"tags": "t1", "image_size": [8, 6], "caption": "old"},
                "elsewhere/z": {"caption": "keep me"}}
    in_json.write_text(json.dumps(original), encoding="utf-8")
    out = tmp_path / "out.json"
    r = run_tool(CAPTIONS, tree, out, "--in_json", in_json)
    assert r.returncode == 1
    merged = read_json(out)
    assert merged["a"] == {"tags": "t1", "image_size": [8, 6], "caption": "café girl ☕, 桜 \nsecond line"}
    assert merged["elsewhere/z"] == {"caption": "keep me"}
    assert merged["e"] == {"caption": "plain"} and set(merged) == {"a", "elsewhere/z", "e"}
    assert read_json(in_json) == original  # the input file is not touched

    # Without --in_json an existing out_json is the starting point (sd-scripts behaviour).
    r = run_tool(TAGS, tree, out)
    assert r.returncode == 0, r.stderr
    again = read_json(out)
    assert again["a"] == {**merged["a"], "tags": "long_hair, blue_eyes"}
    assert again["elsewhere/z"] == {"caption": "keep me"}


def test_stem_keys_resolve_in_the_dataset_loader(tree, tmp_path):
    out = str(tmp_path / "meta.json")
    assert load_script(CAPTIONS).main([str(tree), out]) == 1  # b.caption is not UTF-8
    assert load_script(TAGS).main([str(tree), out]) == 0
    meta = read_json(out)
    assert resolve_metadata_key("a", str(tree)) == [str(tree / "a.png")]
    assert resolve_metadata_key("e", str(tree)) == [str(tree / "e.webp")]
    assert metadata_caption(meta["a"], ", ", False) == "café girl ☕, 桜 \nsecond line, long_hair, blue_eyes"


def test_other_key_forms_of_the_same_image_are_moved(tree, tmp_path):
    # Tags merged with stem keys, then captions with --full_path: one entry per image, not two.
    out = tmp_path / "meta.json"
    out.write_text(json.dumps({"a": {"tags": "x", "image_size": [8, 6]}, "sub/d.png": {"tags": "y"}}),
                   encoding="utf-8")
    r = run_tool(CAPTIONS, tree, out, "--full_path", "--recursive")
    assert r.returncode == 1
    meta = read_json(out)
    a, d, e = str(tree / "a.png"), str(tree / "sub" / "d.png"), str(tree / "e.webp")
    assert set(meta) == {a, d, e}
    assert meta[a] == {"tags": "x", "image_size": [8, 6], "caption": "café girl ☕, 桜 \nsecond line"}
    assert meta[d] == {"tags": "y", "caption": "deep"}
    assert "2 existing entries for the same images moved" in r.stderr


def test_shared_stem_is_reported(tmp_path):
    img = tmp_path / "img"
    make_image(img / "p.png", "PNG")
    make_image(img / "p.jpg", "JPEG")
    (img / "p.txt").write_text("tag", encoding="utf-8")
    metadata = {}
    report = metadata_json.merge_text_files(metadata, metadata_json.list_images(str(img)), field="tags",
                                            extension=".txt", full_path=False, image_dir=str(img))
    assert metadata == {"p": {"tags": "tag"}}
    assert report.shared_keys == ["'p' (p.jpg, p.png)"]


def test_caption_extension_alias_and_missing_dot(tree, tmp_path):
    (tree / "e.cap2").write_text("from cap2", encoding="utf-8")
    out = tmp_path / "m.json"
    r = run_tool(CAPTIONS, tree, out, "--caption_extention", "cap2")
    assert r.returncode == 0, r.stderr
    assert read_json(out) == {"e": {"caption": "from cap2"}}


def test_jsonl_in_and_out(tree, tmp_path):
    in_jsonl = tmp_path / "in.jsonl"
    in_jsonl.write_text('{"image_path": "e", "image_size": [8, 6]}\n\n{"image_path": "q", "caption": "q"}\n',
                        encoding="utf-8")
    out = tmp_path / "out.jsonl"
    r = run_tool(TAGS, tree, out, "--in_json", in_jsonl)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert lines == [{"image_path": "e", "image_size": [8, 6]}, {"image_path": "q", "caption": "q"},
                     {"image_path": "a", "tags": "long_hair, blue_eyes"}]


def test_write_is_atomic_and_keeps_permissions(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    path.write_text('{"old": {}}', encoding="utf-8")
    os.chmod(path, 0o640)
    metadata_json.write_metadata(str(path), {"k": {"caption": "ü"}})
    assert read_json(path) == {"k": {"caption": "ü"}}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert os.listdir(tmp_path) == ["m.json"]

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(metadata_json.os, "replace", failing_replace)
    with pytest.raises(UserError, match="No space left on device"):
        metadata_json.write_metadata(str(path), {"new": {}})
    assert read_json(path) == {"k": {"caption": "ü"}}  # old file intact
    assert os.listdir(tmp_path) == ["m.json"]  # temp file removed


@pytest.mark.parametrize("raw, cleaned", [
    # underscores, emoticons, DeepDanbooru ratings
    ("1girl, long_hair, ^_^, >_<, rating:safe, rating:questionable", "1girl, long hair, ^_^, >_<"),
    # whitespace, empty tags, commas without spaces, newlines, repeated tags (case-insensitive)
    ("  smile ,,  open   mouth,blush\nsmile, Blush,", "smile, open mouth, blush"),
    # generic tag dropped beside a specific one; "hair ornament" too
    ("shirt, white shirt, hair ornament, star hair ornament, skirt", "white shirt, star hair ornament, skirt"),
    # several people: contradicting eye colours and hairstyles go, a single hair length stays
    ("2girls, long hair, blue eyes, red eyes, ponytail, twintails, smile",
     "2girls, long hair, smile"),
    # several people: two hair colours go, the hair length is not a colour
    ("multiple boys, short hair, black hair, white hair, jacket", "multiple boys, short hair, jacket"),
    # one person: two hair colours are kept (multicoloured hair)
    ("1girl, red hair, blue hair", "1girl, red hair, blue hair"),
    ("", ""),
])
def test_clean_tags(raw, cleaned):
    assert clean_tags(raw) == cleaned


@pytest.mark.parametrize("raw, cleaned", [
    ("a young woman holding an anime girl girl doll", "a girl holding an girl doll"),
    ("a cartoon drawing of people", "a drawing of girls"),
    ("anime anime anime woman", "girl"),
    ("a ladybug on a person's personality", "a ladybug on a girl's personality"),  # whole words only
    ("  two   spaces \n\n  second line  ", "two spaces\nsecond line"),
])
def test_clean_caption(raw, cleaned):
    assert clean_caption(raw) == cleaned


def test_clean_script(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({
        "a": {"caption": "a young woman", "tags": "long_hair, shirt, white_shirt", "image_size": [8, 6]},
        "b": {"caption": "a cat"},
    }), encoding="utf-8")
    out = tmp_path / "clean.json"
    r = run_tool(CLEAN, meta, out, "--debug")
    assert r.returncode == 0, r.stderr
    assert read_json(out) == {"a": {"caption": "a girl", "tags": "long hair, white shirt", "image_size": [8, 6]},
                              "b": {"caption": "a cat"}}
    assert "FROM: long_hair, shirt, white_shirt" in r.stderr and "1 entry without tags: b" in r.stderr

    # sd-scripts' old form with train_data_dir first; writing over the input is fine.
    r = run_tool(CLEAN, tmp_path, meta, meta)
    assert r.returncode == 0, r.stderr
    assert "train_data_dir) is ignored" in r.stderr
    assert read_json(meta) == read_json(out)

    meta.write_text(json.dumps({"a": {"tags": ["x"]}}), encoding="utf-8")
    main = load_script(CLEAN).main
    with pytest.raises(UserError, match="entry 'a' has a non-string 'tags'"):
        main([str(meta), str(out)])
    with pytest.raises(UserError, match="in_json .*none.json.* not found"):
        main([str(tmp_path / "none.json"), str(out)])


@pytest.mark.parametrize("script", [CAPTIONS, TAGS, CLEAN])
def test_help_is_light(script):
    r = subprocess.run([sys.executable, "-X", "importtime", script, "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "usage:" in r.stdout
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "PIL", "numpy", "library.data.metadata_json"}
