"""Atomic writes of files and folders, and the clean-up of what a killed writer left behind.

Every file or folder is written under a temporary name beside its final one and renamed into place,
so a crash or kill leaves either the previous version or the new one, never a half-written file:

* `atomic_path(path)` yields a temporary file path; `os.replace` puts it in place.
* `atomic_folder(path)` yields a temporary folder. An existing folder is swapped with it in one
  step on Linux (`renameat2(RENAME_EXCHANGE)`), so a folder under the final name exists at every
  instant. Where the file system cannot exchange, the old folder is first renamed aside to a hidden
  `.<name>.<pid>.<random>.old`; a kill between the two renames leaves that folder, which
  `find_replaced_folder` finds and `remove_leftovers` puts back.
* Temporary names carry the writer's process id (`.<name>.<pid>.<random>.tmp`, `.old`), so
  `remove_leftovers` removes what dead processes left behind and never what a live one is writing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from typing import List, Optional

from library.errors import UserError

logger = logging.getLogger(__name__)

# .<final name>.<pid>.<mkstemp/mkdtemp random part>.<tmp|old>[suffix]
_LEFTOVER = re.compile(r"^\.(?P<final>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.(?P<kind>tmp|old)(?:\..*)?$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _prefix(path: str) -> str:
    return f".{os.path.basename(os.path.normpath(path))}.{os.getpid()}."


@contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename.

    A crash or kill while writing leaves any previous file at `path` untouched.
    """
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp" + suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; saved models get the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def atomic_folder(path: str):
    """Yield a new, empty temporary folder next to `path`; on success it replaces the folder `path`.

    A crash or kill while writing leaves any previous folder at `path` untouched; see the module
    docstring for the replacement itself.
    """
    path = os.path.normpath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without the wrapper (glibc < 2.28, some others)
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_folder(new: str, path: str) -> None:
    """Put the folder `new` at `path`, removing the folder that was there (see the module docstring)."""
    if not os.path.lexists(path):
        os.rename(new, path)
        return
    if not os.path.isdir(path):
        raise UserError(f"{path}: is a file, where a folder is to be saved; move it away or save under another name")
    if _exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)  # now the previous folder, under the temporary name
        return
    old = tempfile.mkdtemp(prefix=_prefix(path), suffix=".old", dir=os.path.dirname(os.path.abspath(path)))
    os.rmdir(old)
    os.rename(path, old)
    os.rename(new, path)
    shutil.rmtree(old, ignore_errors=True)


def check_writable_folder(path: str, flag: str) -> None:
    """Create the folder `path` if needed and prove it writable (a file written and removed): a folder that is a
    file, cannot be created, or sits on a read-only file system is one line naming `flag`, before any work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a file, not a folder; give a folder to save into")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(f"{flag} {path}: cannot write there ({reason}); give a folder you can write in") from None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True  # no cheap check: leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def find_replaced_folder(path: str) -> Optional[str]:
    """The folder a replacement of `path` set aside and did not put back (the writer was killed between
    its two renames), or None. Also finds `<path>.old`, the name earlier versions used."""
    path = os.path.normpath(path)
    parent = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    found = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return None
    for entry in entries:
        match = _LEFTOVER.match(entry)
        if (match and match["kind"] == "old" and match["final"] == name) or entry == name + ".old":
            full = os.path.join(parent, entry)
            if os.path.isdir(full):
                found.append(full)
    return max(found, key=os.path.getmtime) if found else None


def remove_leftovers(folder: str, stem: str = "") -> List[str]:
    """Clean what killed writers left in `folder` for names starting with `stem`: temporary files and
    folders are removed, a folder set aside by an unfinished replacement is put back under its name
    (removed when that name exists again). Returns the paths cleaned. Entries of live processes stay."""
    cleaned = []
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return cleaned
    for entry in entries:
        match = _LEFTOVER.match(entry)
        if not match or not match["final"].startswith(stem) or _alive(int(match["pid"])):
            continue
        full = os.path.join(folder, entry)
        final = os.path.join(folder, match["final"])
        try:
            if match["kind"] == "old" and os.path.isdir(full) and not os.path.lexists(final):
                os.rename(full, final)
                logger.info("put back %s: a save replacing it was interrupted", final)
            elif os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.remove(full)
        except FileNotFoundError:
            continue  # another process of the same run cleaned it first
        cleaned.append(full)
    if cleaned:
        logger.info("removed %d temporary file(s)/folder(s) an interrupted run left in %s", len(cleaned), folder)
    return cleaned
