"""Atomic folder replacement under kill -9 at every point, and the clean-up of what a killed writer left
(library/models/atomic_writes.py, used for state folders and diffusers model folders)."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from library.errors import UserError
from library.models import atomic_writes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A writer replacing `state` (files a and b, both "old") with a new version (both "new"), killed with
# SIGKILL just before its file-system call number KILL_AT (rename, exchange, rmtree), counted from 1.
WRITER = textwrap.dedent("""
    import os, shutil, signal, sys
    sys.path.insert(0, {root!r})
    from library.models import atomic_writes

    kill_at, exchange = int(sys.argv[1]), sys.argv[2] == "exchange"
    calls = [0]

    def counted(function):
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)
        return call

    os.rename = counted(os.rename)
    shutil.rmtree = counted(shutil.rmtree)
    atomic_writes._exchange = counted(atomic_writes._exchange if exchange else lambda a, b: False)
    with atomic_writes.atomic_folder("state") as tmp:
        for name in ("a", "b"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write("new")
    print(calls[0])
""")


def _write_old(folder):
    os.makedirs(folder / "state")
    for name in ("a", "b"):
        (folder / "state" / name).write_text("old")


def _version(folder) -> str:
    contents = {(folder / name).read_text() for name in ("a", "b")}
    assert len(contents) == 1, f"a half-replaced folder: {contents}"
    assert sorted(os.listdir(folder)) == ["a", "b"]
    return contents.pop()


def _run_writer(tmp_path, kill_at, mode):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=ROOT))
    return subprocess.run([sys.executable, str(script), str(kill_at), mode], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("mode", ["exchange", "two-renames"])
def test_a_kill_at_any_point_of_a_folder_replacement_loses_nothing(tmp_path, mode):
    if mode == "exchange":
        (tmp_path / "x").mkdir()
        (tmp_path / "y").mkdir()
        if not atomic_writes._exchange(str(tmp_path / "x"), str(tmp_path / "y")):
            pytest.skip("this system or file system cannot exchange two folders (renameat2)")
    probe = tmp_path / "probe"
    probe.mkdir()
    _write_old(probe)
    finished = _run_writer(probe, 0, mode)  # no kill: how many calls a whole replacement makes
    assert finished.returncode == 0, finished.stderr
    total = int(finished.stdout)
    assert _version(probe / "state") == "new" and sorted(os.listdir(probe)) == ["state", "writer.py"]
    assert total >= (2 if mode == "exchange" else 3)
    for kill_at in range(1, total + 1):
        folder = tmp_path / f"kill{kill_at}"
        folder.mkdir()
        _write_old(folder)
        killed = _run_writer(folder, kill_at, mode)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        state = str(folder / "state")
        if mode == "exchange":
            assert os.path.isdir(state)  # a folder under the final name at every instant
        found = state if os.path.isdir(state) else atomic_writes.find_replaced_folder(state)
        assert found is not None, os.listdir(folder)
        before = _version(type(folder)(found))
        # the next run's start: leftovers removed, a set-aside folder put back under its name
        atomic_writes.remove_leftovers(str(folder), "state")
        assert sorted(os.listdir(folder)) == ["state", "writer.py"], (kill_at, os.listdir(folder))
        assert _version(folder / "state") == before


def test_leftovers_of_live_processes_and_other_names_stay(tmp_path):
    alive = os.getpid()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    names = [f".lora.safetensors.{dead}.k3j_x9ab.tmp", f".lora-state.{dead}.a1b2c3d4.tmp",
             f".lora.safetensors.{alive}.q1w2e3r4.tmp", f".other.safetensors.{dead}.z9y8x7w6.tmp",
             ".lora.notes.tmp", "lora.safetensors"]
    for name in names:
        if "state" in name:
            (tmp_path / name).mkdir()
            (tmp_path / name / "trainable.safetensors").write_text("x")
        else:
            (tmp_path / name).write_text("x")
    cleaned = atomic_writes.remove_leftovers(str(tmp_path), "lora")
    assert sorted(os.path.basename(p) for p in cleaned) == sorted(names[:2])
    assert sorted(os.listdir(tmp_path)) == sorted(names[2:])


def test_a_file_under_the_folder_name_is_not_replaced(tmp_path):
    (tmp_path / "state").write_text("notes")
    with pytest.raises(UserError, match="state: is a file, where a folder is to be saved"):
        with atomic_writes.atomic_folder(str(tmp_path / "state")) as tmp:
            (tmp_path / tmp / "a").write_text("new")
    assert (tmp_path / "state").read_text() == "notes"
    assert os.listdir(tmp_path) == ["state"]
