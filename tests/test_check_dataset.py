"""Tests of tools/check_dataset.py and `--dataset_check`: text and JSON report, exit codes,
--skip_bad_images, caption token histogram, and that the check needs neither models nor torch."""

import argparse
import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image
from skimage import data

from library.data import flags as dataset_flags
from library.data.check import add_dataset_check_arguments, run_dataset_check
from library.data.report import token_histogram
from library.errors import UserError
from tools.check_dataset import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def small(name, size):
    return Image.fromarray(getattr(data, name)()).resize(size, Image.Resampling.BOX)


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean") / "img"
    folder = root / "5_sks"
    folder.mkdir(parents=True)
    small("astronaut", (256, 256)).save(folder / "square.png")
    small("chelsea", (384, 256)).save(folder / "wide.jpg")
    small("rocket", (200, 300)).save(folder / "tall.png")
    (folder / "square.txt").write_text("an astronaut, portrait", encoding="utf-8")
    (folder / "wide.txt").write_text("a cat, " + ", ".join(f"tag{i}" for i in range(30)), encoding="utf-8")
    reg = root.parent / "reg" / "1_person"
    reg.mkdir(parents=True)
    small("coffee", (300, 200)).save(reg / "cup.png")
    return root


@pytest.fixture(scope="module")
def broken_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken") / "img"
    folder = root / "1_x"
    folder.mkdir(parents=True)
    small("astronaut", (256, 256)).save(folder / "good.png")
    (folder / "good.txt").write_text("good", encoding="utf-8")
    jpeg_path = folder / "cut.jpg"
    small("coffee", (300, 200)).save(jpeg_path, quality=90)
    jpeg_path.write_bytes(jpeg_path.read_bytes()[:2000])
    (folder / "zero.png").write_bytes(b"")
    (folder / "readme.png").write_text("not a picture")
    os.symlink(str(folder / "deleted.png"), folder / "link.png")  # target gone
    small("chelsea", (300, 200)).save(folder / "latin.png")
    (folder / "latin.txt").write_bytes(b"\xe9t\xe9")
    return root


FLAGS = ["--resolution", "256", "--enable_bucket", "--min_bucket_reso", "128", "--max_bucket_reso", "512",
         "--caption_extension", ".txt"]


def test_json_report_schema_and_exit_code(broken_dir, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    status = main(["--train_data_dir", str(broken_dir), *FLAGS, "--json", str(report_path)])
    assert status == 1
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert {"buckets", "images", "bad_files", "missing_captions", "datasets", "token_lengths", "errors"} <= set(report)
    assert report["buckets"] == {"256x256": 1}
    [image] = report["images"]
    assert image["path"].endswith("good.png") and image["bucket"] == [256, 256] and image["caption"] == "good"
    assert image["size"] == [256, 256] and image["repeats"] == 1 and image["caption_tokens"] == 1
    reasons = {os.path.basename(b["path"]): b["reason"] for b in report["bad_files"]}
    assert set(reasons) == {"cut.jpg", "zero.png", "readme.png", "link.png", "latin.txt"}
    assert "truncated" in reasons["cut.jpg"] and "empty file" in reasons["zero.png"]
    assert "not an image" in reasons["readme.png"] and reasons["link.png"].startswith("broken symbolic link")
    assert "not UTF-8" in reasons["latin.txt"]
    assert all(set(b) <= {"path", "reason", "image"} for b in report["bad_files"])
    text = capsys.readouterr().out
    assert "bad files (5):" in text and "FAILED" in text and "--skip_bad_images" in text


def test_skip_bad_images_exits_zero_and_still_lists_them(broken_dir, capsys):
    status = main(["--train_data_dir", str(broken_dir), *FLAGS, "--skip_bad_images"])
    text = capsys.readouterr().out
    assert status == 0
    assert "bad files (5):" in text and "will be left out" in text


def test_clean_dataset_text_report(clean_dir, capsys):
    status = main(["--train_data_dir", str(clean_dir), "--reg_data_dir", str(clean_dir.parent / "reg"), *FLAGS,
                   "--train_batch_size", "2"])
    text = capsys.readouterr().out
    assert status == 0 and text.rstrip().endswith("result: OK")
    assert "4 training image(s) (1 regularization)" in text
    assert re.search(r"#1 \S+5_sks: 3 image\(s\), 5 repeats -> 15 samples/epoch", text)
    assert re.search(r"#2 \S+1_person \(reg\): 1 image\(s\), .* -> 15 samples/epoch", text)
    bucket_lines = dict(re.findall(r"^\s+(\d+x\d+)\s+(\d+)\s+#+$", text, re.M))
    assert sum(int(n) for n in bucket_lines.values()) == 30 and bucket_lines["256x256"] == "5"
    assert "images without a caption (2;" in text  # tall.png and the reg image
    assert "1 caption(s) are longer than 75 tokens" in text


def test_token_histogram_and_max_token_length(clean_dir, tmp_path):
    path = tmp_path / "r.json"
    main(["--train_data_dir", str(clean_dir), *FLAGS, "--json", str(path)])
    tokens = json.loads(path.read_text())["token_lengths"]
    assert tokens["max_length"] == 75 and tokens["over_max"] == 1 and tokens["longest"] > 75
    assert sum(row["count"] for row in tokens["histogram"]) == 3
    assert tokens["over_max_images"][0]["path"].endswith("wide.jpg")
    main(["--train_data_dir", str(clean_dir), *FLAGS, "--max_token_length", "225", "--json", str(path)])
    tokens = json.loads(path.read_text())["token_lengths"]
    assert tokens["max_length"] == 225 and tokens["over_max"] == 0
    assert [row["range"] for row in tokens["histogram"]][:2] == [[0, 45], [46, 90]]


def test_token_histogram_bins():
    rows = token_histogram([0, 15, 16, 75, 76, 200], 75)
    assert [r["range"] for r in rows] == [[0, 15], [16, 30], [31, 45], [46, 60], [61, 75], [76, None]]
    assert [r["count"] for r in rows] == [2, 1, 0, 0, 1, 2]


def test_trainer_dataset_check_flags(broken_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    dataset_flags.add_dataset_arguments(parser)
    dataset_flags.add_config_arguments(parser)
    add_dataset_check_arguments(parser)
    path = tmp_path / "trainer.json"
    args = parser.parse_args(["--train_data_dir", str(broken_dir), *FLAGS, "--dataset_check",
                              "--dataset_check_json", str(path), "--full_check"])
    assert args.dataset_check and args.full_image_check
    assert run_dataset_check(args) == 1
    assert len(json.loads(path.read_text())["bad_files"]) == 5
    assert "report written to" in capsys.readouterr().out


def test_config_problems_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        main(["--dataset_config", str(tmp_path / "missing.toml")])
    with pytest.raises(UserError, match="multiple of 32"):
        config = tmp_path / "steps.toml"
        config.write_text('[[datasets]]\nresolution = 256\nenable_bucket = true\nbucket_reso_steps = 48\n'
                          f'min_bucket_reso = 96\n[[datasets.subsets]]\nimage_dir = "{tmp_path}"\n')
        main(["--dataset_config", str(config), "--sdxl"])


def test_non_dataset_flags_are_ignored_with_a_warning(clean_dir, caplog):
    status = main(["--train_data_dir", str(clean_dir), *FLAGS, "--learning_rate", "1e-4", "--network_dim", "8"])
    assert status == 0
    assert any("--learning_rate 1e-4 --network_dim 8" in r.getMessage() for r in caplog.records)


def run_python(code: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_help_is_light_and_the_check_never_imports_torch(clean_dir):
    heavy = run_python(
        "import sys; from tools.check_dataset import build_parser; build_parser().format_help(); "
        "print(sorted(m for m in ('numpy', 'PIL', 'torch', 'transformers') if m in sys.modules))"
    )
    assert heavy == "[]"
    result = run_python(
        "import sys; from tools.check_dataset import main; "
        f"status = main(['--train_data_dir', {str(clean_dir)!r}, '--resolution', '256', '--enable_bucket', "
        "'--min_bucket_reso', '128', '--caption_extension', '.txt', '--sdxl']); "
        "print(status, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    assert result == "0 False True"  # the tokenizer comes from transformers, which leaves torch alone
