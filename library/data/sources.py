"""Turn resolved dataset subsets into lists of image records (paths + raw captions).

For each dataset of a `ResolvedConfig` this lists DreamBooth folders, reads `<stem><caption_extension>`
captions (with the face-crop stem fallback, else the class tokens), reads fine-tuning metadata
(JSON keyed by full path, relative path or bare stem; or JSONL), pairs ControlNet images with their
conditioning images by stem, splits off validation images and balances regularization images against
training images as sd-scripts does. Output is plain `ImageEntry` records: no image is decoded and no
size is probed here (sizes known from metadata or `metadata_cache.json` are passed through).

Caption files must be UTF-8 (a BOM is accepted). We do not guess other encodings: a wrong guess would
silently train on garbled text. Every bad file is listed, then one UserError names them all.
Missing captions are not errors: they are listed in `DatasetSources.missing_captions`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Optional

from library.data.config import DatasetParams, ResolvedConfig, SubsetParams
from library.data.flags import FOLDER_NAMING_RULE
from library.data.schema import CONTROLNET, DREAMBOOTH, FINETUNE
from library.data import image_files
from library.errors import UserError

logger = logging.getLogger(__name__)

# Matched case-insensitively (sd-scripts matches only all-lower or all-upper case: "x.Png" is skipped there).
IMAGE_EXTENSIONS = frozenset(ext.lower() for ext in image_files.IMAGE_EXTENSIONS)
METADATA_CACHE_FILE = "metadata_cache.json"
_SHOWN = 5  # how many paths a summary message lists


@dataclass
class ImageEntry:
    """One image of a dataset, before any image is opened.

    caption is the raw caption; `library.data.captions.process_caption` with the subset's params turns
    it into the text of one fetch. repeats counts how often the image appears per epoch.
    """

    path: str
    caption: str
    dataset_index: int
    subset_index: int
    repeats: int
    is_reg: bool = False
    loss_weight: float = 1.0  # prior_loss_weight for regularization images
    network_multiplier: float = 1.0  # the dataset's network_multiplier
    image_key: str = ""  # metadata key (fine-tuning) or the path
    image_size: Optional[tuple[int, int]] = None  # (W, H) when known without opening the image
    conditioning_path: Optional[str] = None  # ControlNet / masked-loss conditioning image


@dataclass
class SourceProblem:
    """A problem with one file; errors stop training (after all files were checked)."""

    path: str
    # "not_utf8" | "empty_caption" | "missing_image" | "missing_dir" | "ambiguous_key" | "bad_size" | "bad_caption"
    kind: str
    message: str
    is_error: bool


@dataclass
class DatasetSources:
    dataset_index: int
    train: list[ImageEntry] = field(default_factory=list)
    validation: list[ImageEntry] = field(default_factory=list)
    problems: list[SourceProblem] = field(default_factory=list)
    missing_captions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # {folder or metadata file name: {lower-cased tag: count}} for ss_tag_frequency
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    num_train_images: int = 0  # Σ repeats × images of the training (non-reg) subsets
    num_reg_images: int = 0  # Σ repeats × images of the reg subsets before balancing
    subset_image_counts: dict[int, int] = field(default_factory=dict)
    # Subsets with cache_info whose metadata_cache.json is still to be written: {subset index: entries}
    pending_info_caches: dict[int, list[ImageEntry]] = field(default_factory=dict)

    def raise_for_errors(self) -> None:
        errors = [p for p in self.problems if p.is_error]
        if not errors:
            return
        shown = "; ".join(p.message for p in errors[:_SHOWN])
        more = f"; and {len(errors) - _SHOWN} more" if len(errors) > _SHOWN else ""
        raise UserError(f"dataset #{self.dataset_index + 1}: {len(errors)} file problem(s): {shown}{more}")


@dataclass
class _Item:
    """One image of a subset before repeats/validation/balancing are applied."""

    path: str
    caption: str
    key: str
    size: Optional[tuple[int, int]] = None
    conditioning_path: Optional[str] = None


# --- entry points ---------------------------------------------------------------------------------


def collect_entries(config: ResolvedConfig, strict: bool = True) -> list[DatasetSources]:
    """`collect_dataset` for every dataset of the config."""
    return [
        collect_dataset(dataset, d, prior_loss_weight=config.general.prior_loss_weight, strict=strict)
        for d, dataset in enumerate(config.datasets)
    ]


def collect_dataset(
    dataset: DatasetParams, dataset_index: int = 0, *, prior_loss_weight: float = 1.0, strict: bool = True
) -> DatasetSources:
    """List the images of one dataset.

    strict: raise one UserError for file problems (non-UTF-8 captions, missing images/folders) and
    when no training image is found; with strict=False they are only reported in the result.
    """
    result = DatasetSources(dataset_index)
    seen: list = []
    reg_entries: list[ImageEntry] = []
    for s, subset in enumerate(dataset.subsets):
        label = f"dataset #{dataset_index + 1} subset #{s + 1} ({_subset_location(subset)})"
        if subset.num_repeats < 1:
            result.warnings.append(f"{label}: ignored because num_repeats is {subset.num_repeats} (< 1)")
            continue
        identity = _subset_identity(subset)
        if identity in seen:
            result.warnings.append(f"{label}: ignored, the same source is already used earlier in this dataset")
            continue
        seen.append(identity)

        items, write_cache = _subset_items(subset, result)
        if not items:
            result.warnings.append(f"{label}: ignored, no images found")
            continue
        result.subset_image_counts[s] = len(items)
        if write_cache:
            result.pending_info_caches[s] = [_entry(item, dataset, dataset_index, s, 1, False, 1.0) for item in items]

        if subset.is_reg:
            result.num_reg_images += subset.num_repeats * len(items)
            reg_entries += [
                _entry(item, dataset, dataset_index, s, subset.num_repeats, True, prior_loss_weight) for item in items
            ]
            continue
        train_items, validation_items = split_train_validation(
            items, dataset.validation_split, dataset.validation_seed
        )
        result.num_train_images += subset.num_repeats * len(train_items)
        result.train += [_entry(item, dataset, dataset_index, s, subset.num_repeats, False, 1.0) for item in train_items]
        # Validation images are seen once per validation pass.
        result.validation += [_entry(item, dataset, dataset_index, s, 1, False, 1.0) for item in validation_items]

    if reg_entries:
        if result.num_reg_images > result.num_train_images:
            result.warnings.append("more regularization than training samples: some reg images are not used")
        result.train += balance_reg_entries(reg_entries, result.num_train_images)
    _summarize_missing_captions(result)
    for message in result.warnings:
        logger.warning(message)
    if strict:
        result.raise_for_errors()
        if result.num_train_images == 0:
            raise UserError(_no_data_message(dataset, dataset_index))
    return result


def _entry(item: _Item, dataset: DatasetParams, d: int, s: int, repeats: int, is_reg: bool, weight: float) -> ImageEntry:
    return ImageEntry(
        path=item.path,
        caption=item.caption,
        dataset_index=d,
        subset_index=s,
        repeats=repeats,
        is_reg=is_reg,
        loss_weight=weight,
        network_multiplier=dataset.network_multiplier,
        image_key=item.key,
        image_size=item.size,
        conditioning_path=item.conditioning_path,
    )


def _subset_location(subset: SubsetParams) -> str:
    if subset.kind == FINETUNE:
        return f"metadata_file {subset.metadata_file!r}"
    return f"image_dir {subset.image_dir!r}"


def _subset_identity(subset: SubsetParams) -> tuple:
    def norm(path: Optional[str]) -> Optional[str]:
        return os.path.normpath(os.path.abspath(path)) if path else None

    if subset.kind == FINETUNE:
        return (FINETUNE, norm(subset.metadata_file))
    if subset.kind == CONTROLNET:
        return (CONTROLNET, norm(subset.image_dir), norm(subset.conditioning_data_dir))
    return (DREAMBOOTH, norm(subset.image_dir))


def _no_data_message(dataset: DatasetParams, d: int) -> str:
    if dataset.kind == FINETUNE:
        files = ", ".join(repr(s.metadata_file) for s in dataset.subsets)
        return f"dataset #{d + 1}: no training images: the metadata files {files} have no usable entries"
    folders = ", ".join(repr(s.image_dir) for s in dataset.subsets if not s.is_reg) or "(only reg subsets)"
    extensions = " ".join(sorted(IMAGE_EXTENSIONS))
    return (
        f"dataset #{d + 1}: no training images found in {folders}: an image_dir must directly contain image files "
        f"({extensions}; sub-folders are not searched) and have num_repeats >= 1; with --train_data_dir the "
        f"images go in sub-folders named {FOLDER_NAMING_RULE}"
    )


def _summarize_missing_captions(result: DatasetSources) -> None:
    missing = result.missing_captions
    if missing:
        shown = ", ".join(missing[:_SHOWN]) + (f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else "")
        result.warnings.append(
            f"{len(missing)} image(s) have no caption (class tokens or an empty caption are used): {shown}"
        )


# --- validation split and regularization balancing --------------------------------------------------


def split_train_validation(items: list, validation_split: float, validation_seed: Optional[int]) -> tuple[list, list]:
    """sd-scripts' split: shuffle (seeded by validation_seed, else the global RNG), training = first
    ceil(N·(1−split)), validation = last round(N·split)."""
    if validation_split <= 0:
        return list(items), []
    shuffled = list(items)
    if validation_seed is None:
        random.shuffle(shuffled)
    else:
        # Same sequence as random.seed(validation_seed) but leaves the global RNG untouched.
        random.Random(validation_seed).shuffle(shuffled)
    n = len(shuffled)
    n_train = math.ceil(n * (1 - validation_split))
    n_validation = round(n * validation_split)
    return shuffled[:n_train], shuffled[n - n_validation :] if n_validation else []


def balance_reg_entries(reg_entries: list[ImageEntry], num_train_images: int) -> list[ImageEntry]:
    """Use reg images until their samples (repeats included) reach the training sample count.

    Walk the reg images in order, taking each with its repeats, until the count reaches
    `num_train_images` (later images stay unused); if all are taken and the count is still short,
    loop again adding one repeat per image. Returns new entries with the final repeats.
    """
    used: list[ImageEntry] = []
    total = 0
    for entry in reg_entries:
        if total >= num_train_images:
            break
        used.append(replace(entry))
        total += entry.repeats
    while used and total < num_train_images:
        for entry in used:
            entry.repeats += 1
            total += 1
            if total >= num_train_images:
                break
    return used


# --- listing images and reading captions --------------------------------------------------------------


def list_images(directory: str) -> list[str]:
    """Image files directly in `directory` (not recursive, hidden files skipped), sorted.

    A symbolic link with an image extension whose target is gone is listed too, so the scan reports
    it as a bad file instead of the image silently missing from training."""
    paths = []
    with os.scandir(directory) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if not entry.is_file() and not (entry.is_symlink() and not os.path.exists(entry.path)):
                continue
            if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                paths.append(os.path.join(directory, entry.name))
    return sorted(paths)


def caption_candidates(image_path: str, caption_extension: str) -> list[str]:
    """Caption files tried for an image: `<stem><ext>`, then for face-crop names
    `name_cx_cy_w_h` (5+ `_` parts) the name without its last four parts."""
    directory, name = os.path.split(image_path)
    stem = os.path.splitext(name)[0]
    candidates = [os.path.join(directory, stem + caption_extension)]
    parts = stem.split("_")
    if len(parts) >= 5:
        candidates.append(os.path.join(directory, "_".join(parts[:-4]) + caption_extension))
    return candidates


def read_caption_file(path: str, enable_wildcard: bool) -> tuple[Optional[str], Optional[SourceProblem]]:
    """Read a caption file: the first line stripped, or with wildcards every non-empty line.

    Returns (caption, problem); caption is None when the file is not UTF-8.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        message = f"{path}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); re-save it as UTF-8"
        return None, SourceProblem(path, "not_utf8", message, True)
    if text == "":
        return "", SourceProblem(path, "empty_caption", f"{path}: empty caption file, an empty caption is used", False)
    # Universal newlines, as text-mode reading does in sd-scripts.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if enable_wildcard:
        return "\n".join(line.strip() for line in lines if line.strip()), None
    return lines[0].strip(), None


def _caption_for_image(image_path: str, subset: SubsetParams, result: DatasetSources) -> str:
    for candidate in caption_candidates(image_path, subset.caption_extension):
        if os.path.isfile(candidate):
            caption, problem = read_caption_file(candidate, subset.enable_wildcard)
            if problem is not None:
                result.problems.append(problem)
            if caption is not None:
                return caption
            break
    result.missing_captions.append(image_path)
    return subset.class_tokens or ""


def _record_tag_frequency(result: DatasetSources, name: str, captions: Iterable[str]) -> None:
    counts = result.tag_frequency.setdefault(name, {})
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1


def _subset_items(subset: SubsetParams, result: DatasetSources) -> tuple[list[_Item], bool]:
    """The subset's images, and whether its metadata_cache.json still has to be written."""
    if subset.kind == FINETUNE:
        return _finetune_items(subset, result), False
    if not os.path.isdir(subset.image_dir):
        message = f"{subset.image_dir}: image_dir is not a folder"
        result.problems.append(SourceProblem(subset.image_dir, "missing_dir", message, True))
        return [], False
    items, from_cache = _folder_items(subset, result)
    _record_tag_frequency(result, os.path.basename(os.path.normpath(subset.image_dir)), (i.caption for i in items))
    if subset.kind == CONTROLNET and items:
        _pair_conditioning_images(subset, items)
    return items, subset.cache_info and not from_cache


def _folder_items(subset: SubsetParams, result: DatasetSources) -> tuple[list[_Item], bool]:
    """Images of a DreamBooth/ControlNet folder with their captions, and whether they came from
    metadata_cache.json (cache_info)."""
    if subset.cache_info:
        cached = _read_info_cache(subset.image_dir, result)
        if cached is not None:
            for item in cached:
                if not item.caption:
                    result.missing_captions.append(item.path)
            return cached, True
    items = [_Item(path, _caption_for_image(path, subset, result), path) for path in list_images(subset.image_dir)]
    return items, False


def _pair_conditioning_images(subset: SubsetParams, items: list[_Item]) -> None:
    cond_dir = subset.conditioning_data_dir
    if not os.path.isdir(cond_dir):
        raise UserError(f"conditioning_data_dir {cond_dir!r} is not a folder")
    by_stem: dict[str, str] = {}
    for path in list_images(cond_dir):
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in by_stem:
            raise UserError(
                f"{cond_dir}: two conditioning images share the name {stem!r} "
                f"({os.path.basename(by_stem[stem])}, {os.path.basename(path)}); keep one"
            )
        by_stem[stem] = path

    image_stems = {os.path.splitext(os.path.basename(item.path))[0] for item in items}
    missing = [os.path.basename(item.path) for item in items if os.path.splitext(os.path.basename(item.path))[0] not in by_stem]
    orphans = sorted(os.path.basename(p) for stem, p in by_stem.items() if stem not in image_stems)
    if missing or orphans:
        parts = []
        if missing:
            parts.append(f"{len(missing)} image(s) in {subset.image_dir!r} have no conditioning image: {_few(missing)}")
        if orphans:
            parts.append(f"{len(orphans)} conditioning image(s) in {cond_dir!r} have no training image: {_few(orphans)}")
        raise UserError("; ".join(parts) + " (pairs are matched by file name without extension)")
    for item in items:
        item.conditioning_path = by_stem[os.path.splitext(os.path.basename(item.path))[0]]


def _few(names: list[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


# --- metadata_cache.json (cache_info) ------------------------------------------------------------------


def _read_info_cache(image_dir: str, result: DatasetSources) -> Optional[list[_Item]]:
    """Items from `<image_dir>/metadata_cache.json`, or None when absent or unreadable (then rescan)."""
    path = os.path.join(image_dir, METADATA_CACHE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
        items = []
        for image_path, info in data.items():
            width, height = info["resolution"]
            items.append(_Item(image_path, info.get("caption") or "", image_path, (int(width), int(height))))
        return items
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        result.warnings.append(f"{path}: unreadable image info cache ({e}); rescanning the folder")
        return None


def write_info_caches(sources: DatasetSources, image_size: Callable[[str], tuple[int, int]]) -> None:
    """Write `metadata_cache.json` for subsets with cache_info that had none.

    image_size(path) -> (W, H) is supplied by the caller (this module never opens images).
    """
    by_dir: dict[str, list[ImageEntry]] = {}
    for entries in sources.pending_info_caches.values():
        for entry in entries:
            by_dir.setdefault(os.path.dirname(entry.path), []).append(entry)
    for directory, entries in by_dir.items():
        cache = {}
        for entry in entries:
            width, height = entry.image_size or image_size(entry.path)
            cache[entry.path] = {"caption": entry.caption, "resolution": [int(width), int(height)]}
        with open(os.path.join(directory, METADATA_CACHE_FILE), "w", encoding="utf-8") as f:
            json.dump(cache, f, ensure_ascii=False, indent=2)
    sources.pending_info_caches.clear()


# --- fine-tuning metadata ---------------------------------------------------------------------------------


def load_metadata(metadata_file: str) -> dict[str, dict]:
    """Read a metadata `.json` ({key: record}) or `.jsonl` (one {"image_path", ...} per line)."""
    if not os.path.isfile(metadata_file):
        raise UserError(f"metadata_file {metadata_file!r} not found")
    try:
        with open(metadata_file, "r", encoding="utf-8-sig") as f:
            if metadata_file.lower().endswith(".jsonl"):
                return _parse_jsonl(metadata_file, f)
            data = json.load(f)
    except UnicodeDecodeError:
        raise UserError(f"{metadata_file}: not UTF-8 text; re-save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{metadata_file}: malformed JSON: {e.msg} (at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{metadata_file}: expected a JSON object {{image key: {{\"caption\": ...}}}}")
    for key, record in data.items():
        if not isinstance(record, dict):
            raise UserError(f"{metadata_file}: entry {key!r} must be an object like {{\"caption\": \"...\"}}")
    return data


def _parse_jsonl(metadata_file: str, lines) -> dict[str, dict]:
    records: dict[str, dict] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{metadata_file}:{number}: malformed JSON line: {e.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get("image_path"), str):
            raise UserError(f"{metadata_file}:{number}: each line needs an \"image_path\" string")
        records[record["image_path"]] = record
    return records


def metadata_caption(record: dict, caption_separator: str, enable_wildcard: bool) -> str:
    """caption + separator + tags (tags alone when there is no caption). With wildcards the tags
    (newlines turned into separators) are appended to every caption line."""
    caption = record.get("caption") or ""
    tags = record.get("tags") or ""
    if enable_wildcard:
        tags = tags.replace("\n", caption_separator)
        if caption and tags:
            lines = [line for line in caption.split("\n") if line.strip()]
            return "\n".join(f"{line}{caption_separator}{tags}" for line in lines)
        return caption or tags
    if tags:
        return caption + caption_separator + tags if caption else tags
    return caption


class MetadataKeyResolver:
    """Finds the image file a metadata key means; folder listings are made once and reused.

    Tried in order: the key as a path; the key relative to image_dir; the key as a path without
    extension (relative to image_dir first, then as given), completed with any image extension.
    The last step is what sd-scripts lacks: `merge_captions_to_metadata.py` writes bare stems.
    """

    def __init__(self, image_dir: Optional[str]):
        self.image_dir = image_dir
        self._listings: dict[str, dict[str, list[str]]] = {}

    def resolve(self, key: str) -> list[str]:
        """Candidate image paths, best first; empty when none exists."""
        if os.path.isfile(key):
            return [key]
        if self.image_dir and os.path.isfile(os.path.join(self.image_dir, key)):
            return [os.path.join(self.image_dir, key)]
        bases = [key]
        if self.image_dir and not os.path.isabs(key):
            bases.insert(0, os.path.join(self.image_dir, key))
        for base in bases:
            directory, stem = os.path.split(base)
            found = self._stems(directory or ".").get(stem, [])
            if found:
                return found
        return []

    def _stems(self, directory: str) -> dict[str, list[str]]:
        if directory not in self._listings:
            by_stem: dict[str, list[str]] = {}
            if os.path.isdir(directory):
                for path in list_images(directory):
                    by_stem.setdefault(os.path.splitext(os.path.basename(path))[0], []).append(path)
            self._listings[directory] = by_stem
        return self._listings[directory]


def resolve_metadata_key(key: str, image_dir: Optional[str]) -> list[str]:
    """`MetadataKeyResolver(image_dir).resolve(key)` for a single key."""
    return MetadataKeyResolver(image_dir).resolve(key)


def _finetune_items(subset: SubsetParams, result: DatasetSources) -> list[_Item]:
    metadata = load_metadata(subset.metadata_file)
    resolver = MetadataKeyResolver(subset.image_dir)
    items = []
    tags = []
    for key, record in metadata.items():
        matches = resolver.resolve(key)
        if not matches:
            where = f" (also tried inside image_dir {subset.image_dir!r})" if subset.image_dir else " (set image_dir for relative keys)"
            message = f"{subset.metadata_file}: no image for key {key!r}{where}"
            result.problems.append(SourceProblem(key, "missing_image", message, True))
            continue
        if len(matches) > 1:
            message = f"{subset.metadata_file}: key {key!r} matches {len(matches)} images; using {matches[0]}"
            result.problems.append(SourceProblem(key, "ambiguous_key", message, False))
        bad_field = next((f for f in ("caption", "tags") if record.get(f) is not None and not isinstance(record[f], str)), None)
        if bad_field:
            message = f"{subset.metadata_file}: key {key!r} has a non-string {bad_field!r}"
            result.problems.append(SourceProblem(key, "bad_caption", message, True))
            continue
        caption = metadata_caption(record, subset.caption_separator, subset.enable_wildcard)
        if not caption:
            result.missing_captions.append(matches[0])
        if record.get("tags"):
            tags.append(record["tags"])
        items.append(_Item(matches[0], caption, key, _metadata_size(record, key, subset, result)))
    _record_tag_frequency(result, os.path.basename(subset.metadata_file), tags)
    return items


def _metadata_size(record: dict, key: str, subset: SubsetParams, result: DatasetSources) -> Optional[tuple[int, int]]:
    size = record.get("image_size")
    if size is None:
        return None
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        return (size[0], size[1])
    message = f"{subset.metadata_file}: key {key!r} has image_size {size!r}, expected [W, H]; it will be measured"
    result.problems.append(SourceProblem(key, "bad_size", message, False))
    return None
