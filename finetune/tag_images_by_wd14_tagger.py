"""Tag images with a WD14 (or tag-mapping) tagger model on onnxruntime, offline.

    python finetune/tag_images_by_wd14_tagger.py [flags] TRAIN_DATA_DIR

Writes `<image stem>.txt` beside every image (the tags, comma-separated), or one JSON/JSONL file
with --output_path. The model is read from MODEL_DIR/owner_name (`--repo_id owner/name`, default
SmilingWolf/wd-v1-4-convnext-tagger-v2: model.onnx and selected_tags.csv) and is never downloaded;
when it is missing the tagger says which files to download and where to put them. onnxruntime
uses CUDA when onnxruntime-gpu is installed and sees a GPU, else the CPU. Unreadable images are
listed and skipped. Exit status: 0; 1 when some images or caption files could not be read (the
others are tagged); 2 for bad arguments or a missing model. See docs/labelling.md.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from library.data.labelling.wd14_tagger import add_tagger_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tagger_arguments(p)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    from library.refused_options import refuse_set_options

    refuse_set_options(args, parser)
    from library.data.labelling.wd14_tagger import tag_folder

    return 1 if tag_folder(args).failed else 0


if __name__ == "__main__":
    run(main)
