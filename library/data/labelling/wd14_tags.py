"""Tag tables of tagger models and the choice and order of an image's tags.

Two model layouts (facts: sd-scripts' `tag_images_by_wd14_tagger.py`):
* WD14 (`selected_tags.csv`, header `tag_id,name,category,...`): row i names output i. Danbooru
  categories 9 rating, 0 general, 4 character, and, when a CSV has them, 1 artist, 3 copyright,
  5 meta. Outputs are probabilities. Tags keep the model's (CSV) order.
* tag-mapping (`tag_mapping.json`, `{"<id>": {"tag", "category"}}` with category Rating, General,
  Character, Copyright, Meta, Model, Quality or Artist): output <id> is that tag; ids absent from
  the map are ignored. Outputs are logits (the caller applies the sigmoid). Tags are ordered by
  probability, highest first.

Name transforms run once on the table, in this order for both layouts: `--character_tag_expand`
(`name_(series)` → `name<sep>series`, character tags only), `--remove_underscore` (`_` → space in
tags longer than 3 characters, so emoticons like `^_^` stay), then `--tag_replacement`. Everything
that matches names afterwards (undesired, always-first, appending) sees the transformed names.

Per image (`choose_tags`): tags at or above their category's threshold; the rating (and quality)
is the highest-scoring one of its category, thresholds ignored, placed first or last; character
tags optionally first, in their own order. The list is then split into single tags on the stripped
separator (an expanded `name, series` is two tags), undesired and repeated tags are dropped, and
`--always_first_tags` present move to the front in the order given.

Differences from sd-scripts (its bugs, see the spec): no crash on a character tag above its
threshold; `--tag_replacement` replaces exactly the named tags (sd-scripts changed none, or every
tag); always-first entries are stripped and keep their listed order (sd-scripts put the last one
first and never matched `" 1boy"`); character-first keeps the characters' order; when both rating
flags are given the rating goes last in both layouts; the tag-mapping layout picks the rating and
quality by highest score like the WD14 layout; undesired tags and duplicates are also removed
from expanded character tags.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from library.errors import UserError

logger = logging.getLogger(__name__)

RATING, GENERAL, CHARACTER, COPYRIGHT, META, MODEL, QUALITY, ARTIST = (
    "rating", "general", "character", "copyright", "meta", "model", "quality", "artist")
# Categories kept by a threshold (rating and quality are picked by highest score instead).
THRESHOLD_CATEGORIES = (GENERAL, CHARACTER, COPYRIGHT, META, MODEL, ARTIST)
# Danbooru category numbers used by selected_tags.csv.
_CSV_CATEGORIES = {"9": RATING, "0": GENERAL, "4": CHARACTER, "1": ARTIST, "3": COPYRIGHT, "5": META}
_MAPPING_CATEGORIES = {"Rating": RATING, "General": GENERAL, "Character": CHARACTER, "Copyright": COPYRIGHT,
                       "Meta": META, "Model": MODEL, "Quality": QUALITY, "Artist": ARTIST}

WD14, MAPPING = "wd14", "tag-mapping"


@dataclass
class TagTable:
    """Tag name and category of every model output (None where an output names no tag)."""

    layout: str
    names: list  # index = model output
    categories: list
    source: str  # the file it came from, for messages

    def indices(self, category: str) -> np.ndarray:
        """Output indices of the category's tags, in output order (computed once per category)."""
        cache = self.__dict__.setdefault("_indices", {})
        if category not in cache:
            cache[category] = np.array([i for i, c in enumerate(self.categories) if c == category], dtype=np.int64)
        return cache[category]

    def has(self, category: str) -> bool:
        return category in self.categories


def read_selected_tags(path: str) -> TagTable:
    """The WD14 table from `selected_tags.csv`."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not rows or [h.strip() for h in rows[0][:3]] != ["tag_id", "name", "category"]:
        raise UserError(f"{path}: not a WD14 tag list (the first line must start with tag_id,name,category)")
    names, categories = [], []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) < 3:
            raise UserError(f"{path} line {number}: expected tag_id,name,category, got {row!r}")
        category = _CSV_CATEGORIES.get(row[2].strip())
        names.append(row[1] if category else None)
        categories.append(category)
    return TagTable(WD14, names, categories, path)


def read_tag_mapping(path: str) -> TagTable:
    """The tag-mapping table from `tag_mapping.json`."""
    try:
        with open(path, encoding="utf-8") as f:
            mapping = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(mapping, dict) or not mapping:
        raise UserError(f"{path}: expected an object {{\"<id>\": {{\"tag\": ..., \"category\": ...}}}}")
    entries = {}
    for key, entry in mapping.items():
        try:
            index, name, category = int(key), entry["tag"], entry["category"]
        except (ValueError, TypeError, KeyError):
            raise UserError(f"{path}: entry {key!r} must be \"<id>\": {{\"tag\": ..., \"category\": ...}}") from None
        if category not in _MAPPING_CATEGORIES:
            raise UserError(f"{path}: entry {key!r} has category {category!r}; expected one of "
                            + ", ".join(_MAPPING_CATEGORIES))
        entries[index] = (name, _MAPPING_CATEGORIES[category])
    size = max(entries) + 1
    names, categories = [None] * size, [None] * size
    for index, (name, category) in entries.items():
        names[index], categories[index] = name, category
    return TagTable(MAPPING, names, categories, path)


def check_outputs(table: TagTable, n_outputs: int) -> None:
    """The model must score every tag of the table (more outputs than tags: the extra are ignored
    in the tag-mapping layout, whose ids may be sparse)."""
    if table.layout == WD14 and n_outputs != len(table.names):
        raise UserError(f"the model has {n_outputs} outputs but {table.source} lists {len(table.names)} tags: "
                        "the two files are from different models")
    if n_outputs < len(table.names):
        raise UserError(f"the model has {n_outputs} outputs but {table.source} names output {len(table.names) - 1}: "
                        "the two files are from different models")


# --- name transforms ----------------------------------------------------------------------------


def expand_character_tag(tag: str, separator: str) -> str:
    """`name_(series)` → `name<separator>series` (text before the last `(`, one trailing `_` removed)."""
    if not tag.endswith(")") or "(" not in tag:
        return tag
    head, _, tail = tag.rpartition("(")
    if head.endswith("_"):
        head = head[:-1]
    if not head:
        return tag  # a tag that is all parenthesis, e.g. "(series)", has nothing to expand
    return head + separator + tail[:-1]


def remove_underscore(tag: str) -> str:
    return tag.replace("_", " ") if len(tag) > 3 else tag


def parse_replacements(text: str) -> list:
    """`src,dst;src,dst` with `\\,` and `\\;` escapes → [(src, dst)], items stripped."""
    pairs, current, item = [], [], []
    escaped = False
    for ch in text:
        if escaped:
            item.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            current.append("".join(item))
            item = []
        elif ch == ";":
            current.append("".join(item))
            pairs.append(current)
            current, item = [], []
        else:
            item.append(ch)
    if escaped:
        item.append("\\")
    current.append("".join(item))
    pairs.append(current)
    result = []
    for pair in pairs:
        if len(pair) == 1 and not pair[0].strip():
            continue  # a trailing ';'
        if len(pair) != 2 or not pair[0].strip():
            raise UserError(f"--tag_replacement: {','.join(pair)!r} is not `source,target`; write "
                            "`src1,dst1;src2,dst2` and escape a comma or semicolon inside a tag as \\, or \\;")
        result.append((pair[0].strip(), pair[1].strip()))
    return result


def transform_names(table: TagTable, *, separator: str, expand_characters: bool, underscores_to_spaces: bool,
                    replacements: Sequence = ()) -> TagTable:
    """A copy of the table with the name transforms applied (see the module docstring)."""
    names = list(table.names)
    for i, (name, category) in enumerate(zip(names, table.categories)):
        if name is None:
            continue
        if expand_characters and category == CHARACTER:
            name = expand_character_tag(name, separator)
        if underscores_to_spaces:
            name = remove_underscore(name)
        names[i] = name
    for source, target in replacements:
        hits = [i for i, name in enumerate(names) if name == source]
        if not hits:
            logger.warning(f"--tag_replacement: no tag named {source!r} in {table.source} (after the other name changes)")
        for i in hits:
            names[i] = target
    return TagTable(table.layout, names, list(table.categories), table.source)


# --- choosing an image's tags -------------------------------------------------------------------


def split_list(text: Optional[str], separator: str) -> list:
    """A user list or caption split on the stripped separator, items stripped, empty ones dropped."""
    if not text:
        return []
    return [item.strip() for item in text.split(separator.strip()) if item.strip()]


@dataclass
class TagOptions:
    thresholds: dict  # category → threshold, for THRESHOLD_CATEGORIES
    separator: str = ", "
    undesired: frozenset = frozenset()
    rating: Optional[str] = None  # "first", "last" or None
    quality: Optional[str] = None
    characters_first: bool = False
    always_first: list = field(default_factory=list)

    def __post_init__(self):
        if not self.separator.strip():
            raise UserError(f"--caption_separator {self.separator!r} has no visible character; tags need one to "
                            "be told apart, e.g. ', ' or ','")


@dataclass
class ImageTags:
    tags: list  # in caption order, one tag each
    by_category: dict  # category → tags chosen for it (before undesired/duplicate removal), for --debug


def _kept(probs: np.ndarray, table: TagTable, options: TagOptions, by_category: dict) -> tuple:
    """(characters, others) at or above their thresholds, as (score, output index) lists."""
    characters, others = [], []
    for category in THRESHOLD_CATEGORIES:
        idx = table.indices(category)
        if not len(idx):
            continue
        chosen = idx[probs[idx] >= options.thresholds[category]]
        by_category[category] = [table.names[i] for i in chosen]
        (characters if category == CHARACTER else others).extend((float(probs[i]), int(i)) for i in chosen)
    return characters, others


def _best(probs: np.ndarray, table: TagTable, category: str) -> Optional[str]:
    idx = table.indices(category)
    if not len(idx):
        return None
    return table.names[int(idx[np.argmax(probs[idx])])]


def choose_tags(probs: np.ndarray, table: TagTable, options: TagOptions) -> ImageTags:
    """The tags of one image from its scores (probabilities, one per model output)."""
    by_category: dict = {}
    characters, others = _kept(probs, table, options, by_category)
    if table.layout == MAPPING:
        key = lambda t: (-t[0], t[1])  # noqa: E731  highest score first, ties in output order
    else:
        key = lambda t: t[1]  # noqa: E731  output (CSV) order
    if options.characters_first:
        ordered = sorted(characters, key=key) + sorted(others, key=key)
    else:
        ordered = sorted(characters + others, key=key)
    tags = [table.names[i] for _, i in ordered]
    for category, position in ((QUALITY, options.quality), (RATING, options.rating)):
        if position is None:
            continue
        best = _best(probs, table, category)
        if best is None:
            continue
        by_category[category] = [best]
        tags = [best] + tags if position == "first" else tags + [best]
    return ImageTags(finish_tags(tags, options), by_category)


def finish_tags(tags: Sequence, options: TagOptions) -> list:
    """Split into single tags, drop undesired and repeated ones, move always-first tags to the front."""
    result, seen = [], set()
    for tag in tags:
        for piece in split_list(tag, options.separator):
            if piece not in options.undesired and piece not in seen:
                seen.add(piece)
                result.append(piece)
    front = [tag for tag in dict.fromkeys(options.always_first) if tag in seen]
    return front + [tag for tag in result if tag not in front]


def merge_existing(existing_text: str, tags: Sequence, separator: str) -> list:
    """`--append_tags`: the existing caption's tags, then the new tags not among them."""
    existing = split_list(existing_text.strip("\r\n"), separator)
    have = set(existing)
    return existing + [tag for tag in tags if tag not in have]
