"""Clean the captions and tags of a fine-tuning metadata JSON (sd-scripts' heuristic cleanup).

    python finetune/clean_captions_and_tags.py [--debug] IN_JSON OUT_JSON

Tags: underscores become spaces (short emoticons like ^_^ excepted), DeepDanbooru rating tags and
repeated tags go, contradicting hair/eye/sleeve/hairstyle tags go when several people are tagged,
and a generic tag goes when a more specific one exists ("shirt" beside "white shirt"). Captions:
BLIP's "anime woman", "a cartoon drawing", ... become "girl", "a drawing", ... Whitespace and
commas are normalised. Other fields are untouched; OUT_JSON may be IN_JSON. The old three-argument
form `TRAIN_DATA_DIR IN_JSON OUT_JSON` is still accepted (the folder is ignored, as in sd-scripts).
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_json", help="metadata file to read")
    p.add_argument("out_json", help="metadata file to write (may be the same file)")
    # sd-scripts once took TRAIN_DATA_DIR first; a third positional shifts the other two.
    p.add_argument("legacy_out_json", nargs="?", default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="print every changed caption and tag string")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.legacy_out_json is not None:
        logging.getLogger(__name__).warning(
            "three arguments given: the first (train_data_dir) is ignored; pass only IN_JSON OUT_JSON")
        args.in_json, args.out_json = args.out_json, args.legacy_out_json
    from library.data.metadata_json import clean_file

    clean_file(args.in_json, args.out_json, debug=args.debug)
    return 0


if __name__ == "__main__":
    run(main)
