"""Our safetensors reader/writer interoperates with the safetensors package and rejects damaged files."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.models import checkpoint_io, safetensors_io
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


def test_converted_tensors_are_exact_and_each_own_their_memory(tmp_path):
    """Conversions go through one reused read buffer: a big tensor, then smaller ones, then a bigger one."""
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(n, generator=g).half() for i, n in enumerate((5000, 300, 7, 4999, 9000))}
    path = str(tmp_path / "c.safetensors")
    save_file(tensors, path)
    for dtype in (torch.bfloat16, torch.float32):
        ours = safetensors_io.load_tensors(path, dtype=dtype)
        for k, t in tensors.items():
            assert ours[k].dtype == dtype and torch.equal(ours[k], t.to(dtype))
        pointers = sorted((v.untyped_storage().data_ptr(), v.untyped_storage().nbytes()) for v in ours.values())
        assert all(a + n <= b for (a, n), (b, _) in zip(pointers, pointers[1:]))  # no two share memory
        ours["t1"].fill_(1)
        assert torch.equal(ours["t0"], tensors["t0"].to(dtype)) and torch.equal(ours["t3"], tensors["t3"].to(dtype))


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


# ---------------------------------------------------------------------------------------------
# zero-copy (memory-mapped) loading


def mapped_files(t: torch.Tensor) -> set:
    """Files of this process's memory maps that hold `t`'s data (Linux /proc/self/maps)."""
    ptr, out = t.data_ptr(), set()
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi and len(parts) == 6:
                out.add(parts[5].strip())
    return out


def is_mapped(t: torch.Tensor, path) -> bool:
    return os.path.realpath(str(path)) in mapped_files(t)


needs_proc_maps = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")


def write_raw(path, entries):
    """A safetensors file with tensors at exactly the given offsets: entries = [(name, dtype, shape, bytes)]
    in data order; the header is padded so that the data section starts at a multiple of 64."""
    import json
    import struct

    header, offset = {}, 0
    for name, dtype, shape, data in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 64)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(e[3] for e in entries))


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@needs_proc_maps
def test_zero_copy_equals_the_copying_read_bit_for_bit(tmp_path):
    path = str(tmp_path / "z.safetensors")
    tensors = sample_tensors()
    tensors["g.big"] = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)).half()
    safetensors_io.save_tensors(tensors, path)
    copied = safetensors_io.load_tensors(path, zero_copy=False)
    mapped = safetensors_io.load_tensors(path, zero_copy=True)
    assert copied.keys() == mapped.keys() == tensors.keys()
    for k in tensors:
        assert mapped[k].dtype == copied[k].dtype and mapped[k].shape == copied[k].shape, k
        assert tensor_bytes(mapped[k]) == tensor_bytes(copied[k]) == tensor_bytes(tensors[k]), k
        assert not is_mapped(copied[k], path), k
    # half-precision tensors are mapped wherever their element size allows (e.ids, an int64 at
    # offset 86, is not: it is copied)
    assert is_mapped(mapped["b.half"], path) and is_mapped(mapped["g.big"], path) and not is_mapped(mapped["e.ids"], path)
    for k, t in mapped.items():
        if is_mapped(t, path):
            # a storage of its own, exactly its bytes: not a view, nothing to clone, saved alone
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size() and not t._is_view(), k
    assert checkpoint_io.read_checkpoint(path).tensors.keys() == tensors.keys()
    assert not any(is_mapped(t, path) for t in checkpoint_io.read_checkpoint(path, zero_copy=False).tensors.values())


@needs_proc_maps
def test_in_place_changes_never_reach_the_file(tmp_path):
    path = tmp_path / "cow.safetensors"
    tensors = {"w": torch.randn(256, 64).half(), "n": torch.arange(1024, dtype=torch.int64)}
    safetensors_io.save_tensors(tensors, str(path))
    before = path.read_bytes()
    loaded = checkpoint_io.read_checkpoint(str(path)).tensors
    assert is_mapped(loaded["w"], path) and is_mapped(loaded["n"], path)
    loaded["w"].add_(1).mul_(3)
    loaded["n"].zero_()
    torch.nn.Parameter(loaded["w"]).data.fill_(7)  # as an optimizer step writes a parameter
    assert path.read_bytes() == before
    again = safetensors_io.load_tensors(str(path))
    assert torch.equal(again["w"], tensors["w"]) and torch.equal(again["n"], tensors["n"])
    assert bool((loaded["w"] == 7).all()) and int(loaded["n"].abs().sum()) == 0  # the change is the process's own


@needs_proc_maps
def test_replacing_or_deleting_a_mapped_file_keeps_the_loaded_values(tmp_path):
    path = str(tmp_path / "r.safetensors")
    old = {"w": torch.randn(512, 8).half()}
    safetensors_io.save_tensors(old, path)
    loaded = safetensors_io.load_tensors(path)
    assert is_mapped(loaded["w"], path)
    safetensors_io.save_tensors({"w": torch.zeros(512, 8).half()}, path)  # atomic: a new file renamed over it
    assert torch.equal(loaded["w"], old["w"])
    assert torch.equal(safetensors_io.load_tensors(path)["w"], torch.zeros(512, 8).half())
    loaded2 = safetensors_io.load_tensors(path)
    os.remove(path)
    assert torch.equal(loaded2["w"], torch.zeros(512, 8).half())


@needs_proc_maps
def test_misaligned_and_converted_tensors_are_read_into_fresh_memory(tmp_path):
    g = torch.Generator().manual_seed(2)
    one = torch.tensor([5], dtype=torch.uint8)
    h = torch.randn(6, 7, generator=g).half()
    f32 = torch.randn(40, generator=g)
    f32_aligned = torch.randn(16, generator=g)
    path = tmp_path / "m.safetensors"
    # data offsets: u8 at 0, f16 at 1 (odd: not element-aligned), f32 at 85 (not element-aligned),
    # pad, f32 at 256 (64-aligned), f16 at 320
    write_raw(path, [
        ("a.u8", "U8", [1], tensor_bytes(one)),
        ("b.f16_odd", "F16", [6, 7], tensor_bytes(h)),
        ("c.f32_odd", "F32", [40], tensor_bytes(f32)),
        ("d.pad", "U8", [256 - 245], bytes(256 - 245)),
        ("e.f32_64", "F32", [16], tensor_bytes(f32_aligned)),
        ("f.f16", "F16", [6, 7], tensor_bytes(h)),
    ])
    loaded = safetensors_io.load_tensors(str(path))
    assert torch.equal(loaded["a.u8"], one) and torch.equal(loaded["b.f16_odd"], h)
    assert torch.equal(loaded["c.f32_odd"], f32) and torch.equal(loaded["e.f32_64"], f32_aligned)
    assert torch.equal(loaded["f.f16"], h)
    assert not is_mapped(loaded["b.f16_odd"], path) and not is_mapped(loaded["c.f32_odd"], path)
    assert is_mapped(loaded["e.f32_64"], path) and is_mapped(loaded["f.f16"], path)
    assert loaded["e.f32_64"].data_ptr() % 64 == 0  # where a fresh tensor would be: same kernels, same results
    # float32 at a 16-byte (not 64-byte) offset is copied: float32 kernels may round by alignment
    write_raw(path, [("a", "U8", [16], bytes(16)), ("b", "F32", [16], tensor_bytes(f32_aligned))])
    loaded = safetensors_io.load_tensors(str(path))
    assert not is_mapped(loaded["b"], path) and torch.equal(loaded["b"], f32_aligned)
    # a conversion reads into a fresh tensor; a per-key dtype converts some and maps the others
    write_raw(path, [("h", "F16", [6, 7], tensor_bytes(h)), ("k", "F16", [6, 7], tensor_bytes(h))])
    loaded = checkpoint_io.read_checkpoint(str(path), dtype=lambda k: torch.float32 if k == "h" else None).tensors
    assert loaded["h"].dtype == torch.float32 and torch.equal(loaded["h"], h.float()) and not is_mapped(loaded["h"], path)
    assert loaded["k"].dtype == torch.float16 and torch.equal(loaded["k"], h) and is_mapped(loaded["k"], path)
    loaded = safetensors_io.load_tensors(str(path), dtype=torch.float16)  # asked dtype == stored dtype
    assert all(is_mapped(t, path) for t in loaded.values())


def test_file_cut_after_its_header_was_read_is_reported(tmp_path):
    path = tmp_path / "late.safetensors"
    safetensors_io.save_tensors({"w": torch.randn(1024).half()}, str(path))
    header = safetensors_io.read_header(str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])  # shrank between the header read and the tensor reads
    for zero_copy in (True, False):
        with pytest.raises(UserError, match=r"late\.safetensors: file is truncated"):
            safetensors_io.load_tensors(str(path), header=header, zero_copy=zero_copy)


@needs_proc_maps
def test_mapping_is_released_with_its_last_tensor(tmp_path):
    import gc

    path = str(tmp_path / "gone.safetensors")
    safetensors_io.save_tensors({"a": torch.ones(300).half(), "b": torch.ones(300).half()}, path)
    loaded = safetensors_io.load_tensors(path)
    a = loaded.pop("a")
    del loaded
    gc.collect()
    real = os.path.realpath(path)
    with open("/proc/self/maps", encoding="utf-8") as f:
        assert real in f.read()  # "a" still holds it
    del a
    gc.collect()
    with open("/proc/self/maps", encoding="utf-8") as f:
        assert real not in f.read()
