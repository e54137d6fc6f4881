"""Where labels go: a caption file beside each image, or one JSON/JSONL file (`--output_path`).

Caption files are `<image path without extension><extension>`, UTF-8, the text and one newline,
written through a temporary file and a rename (an interrupted run never leaves half a file). With
appending, an existing caption file that cannot be read (not UTF-8) is left untouched and the image
counted as failed, rather than overwritten.

`--output_path` collects `{image path: {"tags": text, "image_size": [w, h]}}` (`.json`) or lines
`{"image_path", "caption", "image_size"}` (`.jsonl`), sd-scripts' field names, and writes the file
once at the end through `library.data.metadata_json.write_metadata` (atomic, UTF-8). Keys are
absolute paths, which every loader resolves whatever the current folder.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from library.data.metadata_json import normalize_extension, read_text_file, write_metadata
from library.errors import UserError
from library.models.safetensors_io import atomic_path

logger = logging.getLogger(__name__)


def caption_path(image_path: str, extension: str) -> str:
    return os.path.splitext(image_path)[0] + extension


def resolve_extension(extension: str, misspelt: Optional[str] = None) -> str:
    """`--caption_extension`, or the old `--caption_extention` when given (it wins, as in sd-scripts)."""
    return normalize_extension(misspelt if misspelt is not None else extension)


def write_caption(path: str, text: str) -> None:
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.write(text + "\n")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def read_existing(path: str) -> tuple:
    """(text or "" when there is no file, None) or (None, reason) for an unreadable file."""
    if not os.path.exists(path):
        return "", None
    return read_text_file(path)


class OutputFile:
    """The `--output_path` records, written atomically by `save`."""

    def __init__(self, path: str):
        self.path = path
        self.jsonl = path.lower().endswith(".jsonl")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise UserError(f"--output_path {path}: the folder {directory} does not exist; create it first")
        self.records: dict = {}

    def add(self, image_path: str, text: str, size: tuple) -> None:
        key = os.path.abspath(image_path)
        if self.jsonl:
            self.records[key] = {"caption": text, "image_size": [int(size[0]), int(size[1])]}
        else:
            self.records[key] = {"tags": text, "image_size": [int(size[0]), int(size[1])]}

    def save(self) -> None:
        write_metadata(self.path, self.records)
        logger.info(f"wrote {len(self.records)} entries to {self.path}")
