"""Fine-tuning metadata files: read, write atomically, merge caption/tag files in, clean them up.

Shared by `finetune/merge_captions_to_metadata.py`, `finetune/merge_dd_tags_to_metadata.py` and
`finetune/clean_captions_and_tags.py`. The metadata format is sd-scripts' (`{key: {"caption",
"tags", "image_size", ...}}`, or JSONL with an `image_path` per line); keys are bare stems, paths
relative to the image folder or absolute paths, resolved by `library.data.sources`.

Differences from sd-scripts, all deliberate:
* a caption file that is missing, unreadable or not UTF-8 is reported (count and first few names)
  instead of stopping the run with a traceback; the other images are still merged;
* when an image already has an entry under another key form (stem vs path), that entry is moved
  to the requested key, so the loader never sees the same image twice;
* `--full_path` keys are absolute paths, whatever the current directory;
* the output is written through a temporary file and a rename, so an interrupted run never leaves
  a truncated file; non-ASCII text is written as is (UTF-8), not as `\\uXXXX` escapes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from typing import Optional

from library.data.sources import IMAGE_EXTENSIONS, MetadataKeyResolver, load_metadata
from library.errors import UserError

logger = logging.getLogger(__name__)

SHOWN = 5  # how many names a summary line lists


def _n(count: int, singular: str, plural: str = "") -> str:
    """'1 entry', '2 entries'."""
    return f"{count} {singular if count == 1 else (plural or singular + 's')}"


def _few(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


# --- images ---------------------------------------------------------------------------------------


def list_images(train_data_dir: str, recursive: bool = False) -> list[str]:
    """Image files in `train_data_dir` (and its sub-folders when recursive), sorted.

    Extensions match case-insensitively, like the dataset loader. Hidden files and folders are
    skipped: `.ipynb_checkpoints` and the like hold copies that must not become training images.
    """
    if not os.path.isdir(train_data_dir):
        raise UserError(f"train_data_dir {train_data_dir!r} is not a folder")
    found = []
    for directory, subdirs, files in os.walk(train_data_dir):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".")) if recursive else []
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(os.path.join(directory, name))
    return sorted(found)


def image_key(image_path: str, full_path: bool) -> str:
    """The metadata key for an image: its absolute path, or its stem (sd-scripts' default)."""
    if full_path:
        return os.path.abspath(image_path)
    return os.path.splitext(os.path.basename(image_path))[0]


# --- reading and writing metadata -----------------------------------------------------------------


def read_metadata(path: str, flag: str = "--in_json") -> dict[str, dict]:
    """Entries of a `.json` or `.jsonl` metadata file (JSONL records lose their `image_path`, which
    becomes the key). `flag` names the argument in error messages."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path!r} not found")
    metadata = load_metadata(path)
    if path.lower().endswith(".jsonl"):
        return {key: {k: v for k, v in record.items() if k != "image_path"} for key, record in metadata.items()}
    return metadata


def _serialize(path: str, metadata: dict[str, dict]) -> str:
    if path.lower().endswith(".jsonl"):
        lines = [json.dumps({"image_path": key, **record}, ensure_ascii=False) for key, record in metadata.items()]
        return "".join(line + "\n" for line in lines)
    return json.dumps(metadata, ensure_ascii=False, indent=2) + "\n"


def write_metadata(path: str, metadata: dict[str, dict]) -> None:
    """Write metadata as UTF-8 JSON (indent 2), or JSONL when `path` ends in `.jsonl`.

    The text goes to a temporary file beside `path` that then replaces it, so readers see either
    the old or the new file, never half of one. An existing file's permissions are kept.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"cannot write {path!r}: the folder {directory!r} does not exist; create it first")
    if os.path.isdir(path):
        raise UserError(f"cannot write {path!r}: it is a folder; give a .json file name")
    text = _serialize(path, metadata)
    temp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        # "x" creates the file with the umask's permissions (mkstemp would force 0600).
        with open(temp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            os.chmod(temp, stat.S_IMODE(os.stat(path).st_mode))
        os.replace(temp, path)
    except OSError as e:
        if os.path.exists(temp):
            os.remove(temp)
        raise UserError(f"cannot write {path!r}: {e.strerror or e}") from None


# --- merging caption / tag files ------------------------------------------------------------------


def read_text_file(path: str) -> tuple[Optional[str], Optional[str]]:
    """(text, None) for a readable UTF-8 file (BOM removed, newlines normalised, stripped), else
    (None, reason). Other encodings are not guessed: a wrong guess would train on garbled text."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"cannot read ({e.strerror or e})"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); re-save it as UTF-8"
    return text.replace("\r\n", "\n").replace("\r", "\n").strip(), None


@dataclass
class MergeReport:
    """What a merge did; `summary()` turns it into log lines."""

    field: str
    extension: str
    images: int = 0
    merged: int = 0
    missing: list[str] = field(default_factory=list)  # images without a text file
    unreadable: list[str] = field(default_factory=list)  # "path: reason"
    empty: list[str] = field(default_factory=list)  # text files with no text
    shared_keys: list[str] = field(default_factory=list)  # stem keys claimed by several images
    rekeyed: dict[str, list[str]] = field(default_factory=dict)  # old key -> the new keys it went to

    def summary(self) -> list[tuple[int, str]]:
        """(logging level, message) lines."""
        ext, warn = self.extension, logging.WARNING
        lines = [(logging.INFO, f"merged {self.field!r} for {self.merged} of {_n(self.images, 'image')}")]
        if self.missing:
            lines.append((warn, f"{_n(len(self.missing), 'image')} without a {ext} file (left unchanged): "
                                f"{_few(self.missing)}"))
        if self.unreadable:
            lines.append((warn, f"{_n(len(self.unreadable), ext + ' file')} could not be read (skipped): "
                                f"{_few(self.unreadable)}"))
        if self.empty:
            lines.append((warn, f"{_n(len(self.empty), 'empty ' + ext + ' file')} (an empty {self.field!r} "
                                f"was stored): {_few(self.empty)}"))
        if self.shared_keys:
            lines.append((warn, f"{_n(len(self.shared_keys), 'key')} shared by several images, which then get "
                                f"the same entry (use --full_path to tell them apart): {_few(self.shared_keys)}"))
        if self.rekeyed:
            moved = _n(len(self.rekeyed), "existing entry", "existing entries")
            shown = [f"{old!r} -> {', '.join(map(repr, new))}" for old, new in self.rekeyed.items()]
            lines.append((logging.INFO, f"{moved} for the same images moved to the new key form: {_few(shown)}"))
        return lines


def _keys_by_image(metadata: dict[str, dict], image_dir: str) -> dict[str, list[str]]:
    """{absolute image path: existing keys naming it}, resolved as the dataset loader does."""
    resolver = MetadataKeyResolver(image_dir)
    by_image: dict[str, list[str]] = {}
    for key in metadata:
        for path in resolver.resolve(key):
            by_image.setdefault(os.path.abspath(path), []).append(key)
    return by_image


def merge_text_files(
    metadata: dict[str, dict],
    image_paths: list[str],
    *,
    field: str,
    extension: str,
    full_path: bool,
    image_dir: str,
    debug: bool = False,
) -> MergeReport:
    """Store the text of each image's `<stem><extension>` file as `field` of its entry (in place).

    Entries get the key `image_key(path, full_path)`; other fields of an existing entry are kept.
    An entry that names the same image under another key form is moved to the new key (its
    fields merged under the new ones) instead of leaving the image listed twice.
    """
    report = MergeReport(field, extension, images=len(image_paths))
    aliases = _keys_by_image(metadata, image_dir)
    new_keys: dict[str, str] = {}  # key -> first image that claimed it
    retired: dict[str, list[str]] = {}  # old key -> new keys
    for path in image_paths:
        text_path = os.path.splitext(path)[0] + extension
        if not os.path.isfile(text_path):
            report.missing.append(path)
            continue
        text, problem = read_text_file(text_path)
        if problem is not None:
            report.unreadable.append(f"{text_path}: {problem}")
            continue
        if text == "":
            report.empty.append(text_path)

        key = image_key(path, full_path)
        if key in new_keys:
            report.shared_keys.append(f"{key!r} ({os.path.basename(new_keys[key])}, {os.path.basename(path)})")
        new_keys.setdefault(key, path)
        entry = metadata.setdefault(key, {})
        for old in aliases.get(os.path.abspath(path), []):
            if old != key and old in metadata:
                # Fields already under the new key are newer than the alias's.
                entry = {**metadata[old], **entry}
                retired.setdefault(old, []).append(key)
        entry[field] = text
        metadata[key] = entry
        report.merged += 1
        if debug:
            logger.info(f"{key} {text}")

    for old, new in retired.items():
        if old not in new_keys:
            del metadata[old]
            report.rekeyed[old] = new
    return report


def normalize_extension(extension: str) -> str:
    """A caption extension with its leading dot (".txt" for "txt", as the dataset config does)."""
    extension = extension.strip()
    if not extension or extension == ".":
        raise UserError("--caption_extension is empty; give the caption files' extension, e.g. .caption or .txt")
    return extension if extension.startswith(".") else "." + extension


def merge_folder(
    train_data_dir: str,
    out_json: str,
    *,
    field: str,
    caption_extension: str,
    in_json: Optional[str] = None,
    full_path: bool = False,
    recursive: bool = False,
    debug: bool = False,
) -> MergeReport:
    """The merge tools' whole job: list images, read `in_json` (or an existing `out_json`, as
    sd-scripts does), merge the text files in as `field`, write `out_json`, log a summary."""
    if recursive and not full_path:
        raise UserError("--recursive needs --full_path: images in different sub-folders may share a stem "
                        "(same rule as sd-scripts)")
    extension = normalize_extension(caption_extension)
    image_paths = list_images(train_data_dir, recursive)
    logger.info(f"found {_n(len(image_paths), 'image')} in {train_data_dir}")
    if not image_paths:
        where = "or its sub-folders" if recursive else "(sub-folders are searched only with --recursive)"
        logger.warning(f"no images in {train_data_dir} {where}; extensions: {' '.join(sorted(IMAGE_EXTENSIONS))}")

    source = in_json if in_json is not None else (out_json if os.path.isfile(out_json) else None)
    if source is not None:
        metadata = read_metadata(source, "--in_json" if in_json is not None else "out_json")
        entries = _n(len(metadata), "entry", "entries")
        logger.info(f"read {entries} from {source}; their {field!r} is replaced where a file exists")
    else:
        metadata = {}
        logger.info("no existing metadata: a new file is created")

    report = merge_text_files(metadata, image_paths, field=field, extension=extension, full_path=full_path,
                              image_dir=train_data_dir, debug=debug)
    write_metadata(out_json, metadata)
    for level, message in report.summary():
        logger.log(level, message)
    logger.info(f"wrote {_n(len(metadata), 'entry', 'entries')} to {out_json}")
    return report


# --- cleaning captions and tags -------------------------------------------------------------------
#
# The rules follow sd-scripts' clean_captions_and_tags.py (meant for DeepDanbooru/WD14 tags and BLIP
# captions of anime pictures), applied to a parsed tag list instead of comma-padded strings; the
# differences are listed in docs/finetune-tools.md.

# Tags this short keep their underscores: they are emoticons (^_^, >_<, o_o), the same rule as the
# WD14 tagger's --remove_underscore.
_EMOTICON_MAX_LEN = 3

_WORD = r"[\w\-]+"
_HAIR_LENGTH = re.compile(r"(long|short|medium) hair")
_HAIR = re.compile(rf"{_WORD} hair")
# With several people in the picture, per-person attributes that appear more than once contradict
# each other (whose eyes are blue?), so every tag of such a group is dropped.
_GROUPS_REMOVED_IN_MULTI = [
    _HAIR_LENGTH,
    re.compile(r"(bob|hime) cut"),
    re.compile(rf"{_WORD} eyes"),
    re.compile(rf"({_WORD} sleeves|sleeveless)"),
    re.compile(rf"(ponytail|braid|ahoge|twintails|{_WORD} bun|single hair bun|single side bun|two side up"
               rf"|two tails|{_WORD} braid|sidelocks)"),
]
# A generic tag is dropped when a more specific one ending in it exists ("shirt" beside "white shirt").
_GENERIC = re.compile(rf"({_WORD}|hair ornament)")

# sd-scripts' BLIP caption rewrites, applied in order, each until nothing changes.
CAPTION_REPLACEMENTS = [
    ("anime anime", "anime"),
    ("young ", ""),
    ("anime girl", "girl"),
    ("cartoon female", "girl"),
    ("cartoon lady", "girl"),
    ("cartoon character", "girl"),
    ("cartoon woman", "girl"),
    ("cartoon women", "girls"),
    ("cartoon girl", "girl"),
    ("anime female", "girl"),
    ("anime lady", "girl"),
    ("anime character", "girl"),
    ("anime woman", "girl"),
    ("anime women", "girls"),
    ("lady", "girl"),
    ("female", "girl"),
    ("woman", "girl"),
    ("women", "girls"),
    ("people", "girls"),
    ("person", "girl"),
    ("a cartoon figure", "a figure"),
    ("a cartoon image", "an image"),
    ("a cartoon picture", "a picture"),
    ("an anime cartoon image", "an image"),
    ("a cartoon anime drawing", "a drawing"),
    ("a cartoon drawing", "a drawing"),
    ("girl girl", "girl"),
]


def _phrase_pattern(phrase: str) -> re.Pattern:
    """Whole-word match, so "lady" leaves "ladybug" alone (sd-scripts replaces substrings)."""
    end = r"(?!\w)" if re.match(r"\w", phrase[-1]) else ""
    return re.compile(r"(?<!\w)" + re.escape(phrase) + end)


_CAPTION_PATTERNS = [(_phrase_pattern(old), new) for old, new in CAPTION_REPLACEMENTS]


def split_tags(tags: str) -> list[str]:
    """Tags of a comma-separated string (newlines count as commas), whitespace collapsed, empty
    tags dropped."""
    return [tag for tag in (" ".join(raw.split()) for raw in re.split(r"[,\n]", tags)) if tag]


def _underscores_to_spaces(tag: str) -> str:
    if len(tag) <= _EMOTICON_MAX_LEN:
        return tag
    return " ".join(tag.replace("_", " ").split())


def _is_rating(tag: str) -> bool:
    # DeepDanbooru appends "rating:safe" etc.; WD14's bare "general"/"sensitive" are kept.
    return tag.lower().startswith(("rating:", "rating "))


def _unique(tags: list[str]) -> list[str]:
    seen: set[str] = set()
    kept = []
    for tag in tags:
        if tag.lower() not in seen:
            seen.add(tag.lower())
            kept.append(tag)
    return kept


def _drop_conflicting_attributes(tags: list[str]) -> list[str]:
    for group in _GROUPS_REMOVED_IN_MULTI:
        members = [t for t in tags if group.fullmatch(t)]
        if len(members) > 1:
            tags = [t for t in tags if t not in members]
    # "<word> hair" tags are hair colours here; hair length tags were handled above.
    colours = [t for t in tags if _HAIR.fullmatch(t) and not _HAIR_LENGTH.fullmatch(t)]
    if len(colours) > 1:
        tags = [t for t in tags if t not in colours]
    return tags


def _drop_generic_tags(tags: list[str]) -> list[str]:
    def has_specific(tag: str) -> bool:
        specific = re.compile(r"(\w+ )+" + re.escape(tag))
        return any(specific.fullmatch(other) for other in tags)

    return [t for t in tags if not (_GENERIC.fullmatch(t) and has_specific(t))]


def clean_tags(tags: str) -> str:
    """Tidy a danbooru-style tag string; the rules, in order:

    1. split at commas and newlines, collapse whitespace, drop empty tags;
    2. underscores become spaces, except in tags of at most 3 characters (emoticons like ^_^);
    3. drop DeepDanbooru rating tags (`rating:safe`, ...);
    4. drop repeated tags (case-insensitive, the first spelling is kept);
    5. if a tag contains "girls" or "boys" (several people), drop every tag of a group that has more
       than one: hair length, hair cut, `<x> eyes`, sleeves, hairstyle, then `<x> hair` colours;
    6. drop a one-word tag (or "hair ornament") when a longer tag ends in it ("shirt" beside
       "white shirt");
    7. join with ", ".
    """
    cleaned = _unique([t for t in map(_underscores_to_spaces, split_tags(tags)) if not _is_rating(t)])
    if any("girls" in t or "boys" in t for t in cleaned):
        cleaned = _drop_conflicting_attributes(cleaned)
    return ", ".join(_drop_generic_tags(cleaned))


def clean_caption(caption: str) -> str:
    """Apply CAPTION_REPLACEMENTS as whole words, each until stable, then collapse runs of spaces
    within each line and drop blank lines (lines are kept: they are wildcard alternatives)."""
    for pattern, new in _CAPTION_PATTERNS:
        while True:
            changed = pattern.sub(new, caption)
            if changed == caption:
                break
            caption = changed
    lines = (" ".join(line.split()) for line in caption.replace("\r\n", "\n").split("\n"))
    return "\n".join(line for line in lines if line)


@dataclass
class CleanReport:
    """What a cleanup changed; `summary()` turns it into log lines."""

    entries: int = 0
    tags_changed: int = 0
    captions_changed: int = 0
    without_tags: list[str] = field(default_factory=list)
    without_caption: list[str] = field(default_factory=list)

    def summary(self) -> list[tuple[int, str]]:
        """(logging level, message) lines."""
        entries = _n(self.entries, "entry", "entries")
        lines = [(logging.INFO, f"cleaned {entries}: tags changed in {self.tags_changed}, "
                                f"captions changed in {self.captions_changed}")]
        for missing, name in ((self.without_tags, "tags"), (self.without_caption, "caption")):
            if missing:
                lines.append((logging.INFO, f"{_n(len(missing), 'entry', 'entries')} without {name}: {_few(missing)}"))
        return lines


def _text_field(record: dict, name: str, key: str, source: str) -> Optional[str]:
    value = record.get(name)
    if value is not None and not isinstance(value, str):
        raise UserError(f"{source}: entry {key!r} has a non-string {name!r} ({type(value).__name__}); "
                        f"it must be text like \"a, b\"")
    return value


def clean_metadata(metadata: dict[str, dict], source: str = "metadata", debug: bool = False) -> CleanReport:
    """`clean_tags` / `clean_caption` on every entry, in place; other fields are untouched."""
    report = CleanReport(entries=len(metadata))
    for key, record in metadata.items():
        for name, cleaner, missing in (("tags", clean_tags, report.without_tags),
                                       ("caption", clean_caption, report.without_caption)):
            before = _text_field(record, name, key, source)
            if before is None:
                missing.append(key)
                continue
            after = cleaner(before)
            record[name] = after
            if after != before:
                if name == "tags":
                    report.tags_changed += 1
                else:
                    report.captions_changed += 1
                if debug:
                    logger.info(f"{key} {name}\n  FROM: {before}\n  TO:   {after}")
    return report


def clean_file(in_json: str, out_json: str, debug: bool = False) -> CleanReport:
    """The cleanup tool's whole job: read `in_json`, clean it, write `out_json` (may be the same file)."""
    metadata = read_metadata(in_json, "in_json")
    report = clean_metadata(metadata, in_json, debug)
    write_metadata(out_json, metadata)
    for level, message in report.summary():
        logger.log(level, message)
    logger.info(f"wrote {_n(len(metadata), 'entry', 'entries')} to {out_json}")
    return report
