"""Caption images with BLIP (transformers' BlipForConditionalGeneration), offline.

    python finetune/make_captions.py [flags] TRAIN_DATA_DIR

Writes `<image stem>.caption` beside every image. The model is a transformers BLIP folder (e.g.
Salesforce/blip-image-captioning-large, downloaded beforehand) given with --caption_weights, or
sd-scripts' BLIP checkpoint `model_large_caption.pth` (converted on load; its tokenizer,
bert-base-uncased, must be in the local Hugging Face cache). Nothing is downloaded: a missing
model is one line saying what to download. Nucleus sampling by default (seeded with --seed, so
runs repeat), beam search with --beam_search. Unreadable images are listed and skipped. Exit
status: 0; 1 when some images could not be read; 2 for bad arguments or a missing model. See
docs/labelling.md.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from library.data.labelling.caption_run import add_blip_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_blip_arguments(p)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from library.data.labelling.caption_run import run_blip

    return 1 if run_blip(args) else 0


if __name__ == "__main__":
    run(main)
