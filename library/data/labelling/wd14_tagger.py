"""The WD14 tagger: its flags (sd-scripts' `tag_images_by_wd14_tagger.py`) and the run over a folder.

`tag_folder(args)` checks everything it can before the model runs (model files, tag table, option
values, output folder), then tags the images batch by batch and writes a caption file per image
(or the `--output_path` file at the end), and prints the tag frequencies with `--frequency_tags`.
It returns a `TagReport`: how many images were tagged and failed (unreadable image or caption file),
and the time of the tagging loop and of onnxruntime's part of it.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

from library.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_REPO_ID = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
# --<category>_threshold flags, named after wd14_tags' categories
_THRESHOLD_CATEGORIES = ("general", "character", "meta", "model", "copyright", "artist")


def add_tagger_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("train_data_dir", help="folder of images to tag")
    p.add_argument("--repo_id", default=DEFAULT_REPO_ID,
                   help="model name: owner/name (WD14: model.onnx + selected_tags.csv) or owner/name/folder "
                        "(tag-mapping: model_optimized.onnx + tag_mapping.json); read from MODEL_DIR/owner_name[/folder]")
    p.add_argument("--model_dir", default="wd14_tagger_model",
                   help="folder holding the model folders (or the model files themselves); nothing is downloaded")
    p.add_argument("--force_download", action="store_true",
                   help="refused: nothing is downloaded; put the model files in the folder yourself")
    p.add_argument("--onnx", action="store_true",
                   help="run the ONNX model (always the case here; the TensorFlow model is not supported)")
    p.add_argument("--batch_size", type=int, default=1,
                   help="images per model call (a model with a fixed batch size uses its own)")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None,
                   help="decode and prepare images in this many worker processes (default: in the main process)")
    p.add_argument("--pin_memory", action="store_true", help="pin the loader's memory (CUDA only)")
    p.add_argument("--output_path", default=None,
                   help="write one .json (or .jsonl) file with every image's tags instead of caption files")
    p.add_argument("--caption_extension", default=".txt", help="extension of the caption files (default .txt)")
    p.add_argument("--caption_extention", default=None, help="old misspelt name of --caption_extension")
    p.add_argument("--thresh", type=float, default=0.35, help="score threshold of every category without its own")
    for name in _THRESHOLD_CATEGORIES:
        layout = "" if name in ("general", "character") else "; only models that have such tags"
        p.add_argument(f"--{name}_threshold", type=float, default=None,
                       help=f"threshold of {name} tags (default --thresh{layout})")
    p.add_argument("--recursive", action="store_true", help="also tag images in sub-folders")
    p.add_argument("--remove_underscore", action="store_true",
                   help="write tags with spaces instead of underscores (tags of 3 characters or fewer, like ^_^, kept)")
    p.add_argument("--undesired_tags", default="", help="tags never written, separated like the captions (e.g. 'a, b')")
    p.add_argument("--frequency_tags", action="store_true", help="print how often each tag was written, at the end")
    p.add_argument("--append_tags", action="store_true",
                   help="keep an existing caption file's tags and add the new ones not already in it")
    p.add_argument("--use_rating_tags", action="store_true", help="add the rating tag (general, sensitive, ...) first")
    p.add_argument("--use_rating_tags_as_last_tag", action="store_true", help="add the rating tag last")
    p.add_argument("--use_quality_tags", action="store_true", help="add the quality tag first (tag-mapping models)")
    p.add_argument("--use_quality_tags_as_last_tag", action="store_true",
                   help="add the quality tag last (tag-mapping models)")
    p.add_argument("--character_tags_first", action="store_true", help="character tags before the other tags")
    p.add_argument("--always_first_tags", default=None,
                   help="tags put first, in this order, when the image has them (e.g. '1girl, 1boy')")
    p.add_argument("--caption_separator", default=", ",
                   help="text between tags (default ', '); without its spaces it also splits the tag lists given "
                        "here and existing captions")
    p.add_argument("--tag_replacement", default=None,
                   help="rename tags: 'source,target;source,target'; escape , and ; inside a tag as \\, and \\;")
    p.add_argument("--character_tag_expand", action="store_true",
                   help="write a character tag name_(series) as two tags: name, series")
    p.add_argument("--debug", action="store_true", help="print each image's tags by category")


def _position(first: bool, last: bool):
    if last:
        return "last"  # both flags: "as last tag" says where the rating goes
    return "first" if first else None


def _given_thresholds(args) -> dict:
    """category → its --<category>_threshold, None when not given."""
    return {"general": args.general_threshold, "character": args.character_threshold, "meta": args.meta_threshold,
            "model": args.model_threshold, "copyright": args.copyright_threshold, "artist": args.artist_threshold}


def tag_options(args):
    from library.data.labelling import wd14_tags

    thresholds = {}
    for category, value in _given_thresholds(args).items():
        flag = "--thresh" if value is None else f"--{category}_threshold"
        thresholds[category] = args.thresh if value is None else value
        if not 0.0 <= thresholds[category] <= 1.0:
            raise UserError(f"{flag} {thresholds[category]}: a threshold is a probability between 0 and 1")
    separator = args.caption_separator
    return wd14_tags.TagOptions(
        thresholds=thresholds, separator=separator,
        undesired=frozenset(wd14_tags.split_list(args.undesired_tags, separator)) if separator.strip() else frozenset(),
        rating=_position(args.use_rating_tags, args.use_rating_tags_as_last_tag),
        quality=_position(args.use_quality_tags, args.use_quality_tags_as_last_tag),
        characters_first=args.character_tags_first,
        always_first=wd14_tags.split_list(args.always_first_tags, separator) if separator.strip() else [],
    )


def _warn_unused(args, table) -> None:
    """Options for categories this model does not have change nothing: say so instead of ignoring them."""
    from library.data.labelling.wd14_tags import QUALITY, RATING

    for category, value in _given_thresholds(args).items():
        if value is not None and not table.has(category):
            logger.warning(f"--{category}_threshold: {table.source} has no {category} tags; the option changes nothing")
    if (args.use_quality_tags or args.use_quality_tags_as_last_tag) and not table.has(QUALITY):
        logger.warning(f"--use_quality_tags: {table.source} has no quality tags; no quality tag is written")
    if (args.use_rating_tags or args.use_rating_tags_as_last_tag) and not table.has(RATING):
        logger.warning(f"--use_rating_tags: {table.source} has no rating tags; no rating tag is written")


@dataclass
class TagReport:
    tagged: int
    failed: int
    loop_seconds: float  # from the first image read to the last caption written
    run_seconds: float  # inside onnxruntime's run


def _debug_line(path: str, image_tags) -> str:
    parts = [f"{category}: {', '.join(tags) or '-'}" for category, tags in image_tags.by_category.items()]
    return f"{path}: " + " | ".join(parts)


def tag_folder(args) -> TagReport:
    """Tag every image of `args.train_data_dir`; the number of images that failed."""
    from library.data.labelling import caption_files, wd14_tags
    from library.data.labelling.image_batches import ImageBatches
    from library.data.labelling.wd14_model import PrepareForTagger, TaggerModel, find_model_files, read_tag_table
    from library.data.metadata_json import list_images

    if not args.onnx:
        logger.debug("running the ONNX model (--onnx is implied: the TensorFlow model is not supported)")
    if args.append_tags and args.output_path:
        raise UserError("--append_tags adds to caption files, and --output_path writes no caption files; use one")
    options = tag_options(args)
    extension = caption_files.resolve_extension(args.caption_extension, args.caption_extention)
    replacements = wd14_tags.parse_replacements(args.tag_replacement) if args.tag_replacement else []
    files = find_model_files(args.model_dir, args.repo_id)
    table = wd14_tags.transform_names(
        read_tag_table(files), separator=args.caption_separator, expand_characters=args.character_tag_expand,
        underscores_to_spaces=args.remove_underscore, replacements=replacements)
    _warn_unused(args, table)
    output = caption_files.OutputFile(args.output_path) if args.output_path else None
    paths = list_images(args.train_data_dir, recursive=args.recursive)
    logger.info(f"{len(paths)} images in {args.train_data_dir}; model {files.folder} ({files.layout} layout)")

    model = TaggerModel(files, args.batch_size)
    model.check_tags(table)
    batches = ImageBatches(paths, PrepareForTagger(model.image_size), model.batch_size,
                           args.max_data_loader_n_workers, args.pin_memory, desc="tagging")
    frequencies: dict = {}
    failed = tagged = 0
    start = time.perf_counter()
    for number, batch in enumerate(batches):
        scores = model.run([image.payload for image in batch])
        if number == 0:  # models with a free output size are checked on their first answer
            wd14_tags.check_outputs(table, scores.shape[1])
        for image, row in zip(batch, scores):
            image_tags = wd14_tags.choose_tags(row, table, options)
            if args.debug:
                logger.info(_debug_line(image.path, image_tags))
            for tag in image_tags.tags:
                frequencies[tag] = frequencies.get(tag, 0) + 1
            stored = _store(image, image_tags.tags, output, extension, options.separator, args.append_tags)
            tagged += stored
            failed += not stored
    if output is not None:
        output.save()
    loop_seconds = time.perf_counter() - start
    batches.report_failures()
    if args.frequency_tags:
        print("Tag frequencies:")
        for tag, count in sorted(frequencies.items(), key=lambda item: (-item[1], item[0])):
            print(f"{tag}: {count}")
    return TagReport(tagged, failed + len(batches.failed), loop_seconds, model.run_seconds)


def _store(image, tags, output, extension, separator, append) -> bool:
    from library.data.labelling import caption_files, wd14_tags

    if output is not None:
        output.add(image.path, separator.join(tags), image.size)
        return True
    path = caption_files.caption_path(image.path, extension)
    if append:
        existing, reason = caption_files.read_existing(path)
        if reason is not None:
            logger.error(f"{path}: {reason}; left as it is, no tags added")
            return False
        tags = wd14_tags.merge_existing(existing, tags, separator)
    caption_files.write_caption(path, separator.join(tags))
    return True
