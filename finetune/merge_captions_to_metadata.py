"""Merge caption files (`<image stem>.caption`) into a fine-tuning metadata JSON as "caption".

    python finetune/merge_captions_to_metadata.py [flags] TRAIN_DATA_DIR OUT_JSON

Keys are image stems, or absolute paths with --full_path. Entries already in --in_json (or in
OUT_JSON when it exists and --in_json is not given) are kept; their caption is replaced where a
caption file exists. Images without a caption file, and caption files that are not UTF-8, are
listed and skipped. Exit status: 0, or 1 when some caption files could not be read (the output is
written either way), 2 for bad arguments or input.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_data_dir", help="folder of training images (with their caption files beside them)")
    p.add_argument("out_json", help="metadata file to write (.json; .jsonl writes one record a line)")
    p.add_argument("--in_json", default=None,
                   help="metadata file to start from (default: OUT_JSON when it exists)")
    p.add_argument("--caption_extension", default=".caption", help="extension of the caption files (default .caption)")
    p.add_argument("--caption_extention", dest="caption_extention", default=None,
                   help="old misspelt name of --caption_extension, still accepted")
    p.add_argument("--full_path", action="store_true",
                   help="key entries by absolute image path instead of stem (needed for several folders)")
    p.add_argument("--recursive", action="store_true", help="also take images from sub-folders (needs --full_path)")
    p.add_argument("--debug", action="store_true", help="print every key with its caption")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from library.data.metadata_json import merge_folder

    report = merge_folder(
        args.train_data_dir,
        args.out_json,
        field="caption",
        caption_extension=args.caption_extention or args.caption_extension,
        in_json=args.in_json,
        full_path=args.full_path,
        recursive=args.recursive,
        debug=args.debug,
    )
    return 1 if report.unreadable else 0


if __name__ == "__main__":
    run(main)
