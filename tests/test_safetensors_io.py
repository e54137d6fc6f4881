"""Our safetensors reader/writer interoperates with the safetensors package and rejects damaged files."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from library import checkpoint_io, safetensors_io
from library.errors import UserError


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=g),
        "b.half": torch.randn(7, generator=g).half(),
        "c.bf16": torch.randn(2, 2, generator=g).bfloat16(),
        "d.scalar": torch.tensor(4.5),
        "e.ids": torch.arange(77, dtype=torch.int64)[None],
        "f.empty": torch.zeros(0, 3),
    }


def test_our_files_read_by_safetensors_and_back(tmp_path):
    path = str(tmp_path / "x.safetensors")
    tensors = sample_tensors()
    safetensors_io.save_tensors(tensors, path, {"k": "v"})
    theirs = load_file(path)
    assert theirs.keys() == tensors.keys()
    for k in tensors:
        assert theirs[k].dtype == tensors[k].dtype and torch.equal(theirs[k], tensors[k])
    assert safetensors_io.read_metadata(path) == {"k": "v"}
    ours = safetensors_io.load_tensors(path)
    assert all(torch.equal(ours[k], tensors[k]) for k in tensors)


def test_read_files_written_by_safetensors_with_dtype_conversion(tmp_path):
    path = str(tmp_path / "y.safetensors")
    tensors = sample_tensors()
    save_file(tensors, path, metadata={"m": "1"})
    ours = safetensors_io.load_tensors(path, dtype=torch.float16)
    assert ours["a.weight"].dtype == torch.float16
    assert torch.equal(ours["a.weight"], tensors["a.weight"].half())
    assert ours["e.ids"].dtype == torch.int64  # integers keep their dtype
    only = safetensors_io.load_tensors(path, select=lambda k: k.startswith("b"))
    assert list(only) == ["b.half"]


def test_truncated_file_is_reported_with_its_name(tmp_path):
    path = tmp_path / "t.safetensors"
    safetensors_io.save_tensors(sample_tensors(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(UserError, match=r"t\.safetensors: file is truncated"):
        checkpoint_io.read_checkpoint(str(path))
    path.write_bytes(data[:20])
    with pytest.raises(UserError, match=r"t\.safetensors"):
        checkpoint_io.read_checkpoint(str(path))


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "keep.safetensors")
    safetensors_io.save_tensors({"x": torch.ones(2)}, path)
    with pytest.raises(ValueError):
        safetensors_io.save_tensors({"x": torch.ones(2), "bad": torch.empty(2, device="meta")}, path)
    assert torch.equal(load_file(path)["x"], torch.ones(2))
    assert [f for f in os.listdir(tmp_path)] == ["keep.safetensors"]  # no temp files left behind


def test_metadata_must_be_strings(tmp_path):
    with pytest.raises(ValueError):
        safetensors_io.save_tensors({"x": torch.ones(1)}, str(tmp_path / "m.safetensors"), {"n": 1})
