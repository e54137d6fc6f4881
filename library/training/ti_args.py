"""Command-line flags of the Textual Inversion trainers (train_textual_inversion.py, sdxl_...).

Torch-free, like the other parsers: `--help` answers without loading torch. `script_parsers.ti_parser`
composes the shared groups with these, sd-scripts' own TI flags with their names and defaults.
"""

from __future__ import annotations

import argparse

SAVE_FORMATS = [None, "ckpt", "pt", "safetensors"]


def add_textual_inversion_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("textual inversion")
    g.add_argument("--save_model_as", choices=SAVE_FORMATS, default="pt",
                   help="file format of the embedding (pt and ckpt are torch pickles; default pt, as sd-scripts)")
    g.add_argument("--weights", type=str, default=None,
                   help="start from the vectors of this embedding file (.pt/.safetensors; sd-scripts or A1111 format)")
    g.add_argument("--num_vectors_per_token", type=int, default=1,
                   help="vectors the token stands for (tokens T, T1, ... T{N-1} are added)")
    g.add_argument("--token_string", type=str, default=None,
                   help="the new token; must not exist in the tokenizer, and captions must contain it")
    g.add_argument("--init_word", type=str, default=None,
                   help="initialise the vectors from the embeddings of this word's tokens")
    g.add_argument("--use_object_template", action="store_true",
                   help="ignore captions; use 'a photo of a {}'-style templates")
    g.add_argument("--use_style_template", action="store_true",
                   help="ignore captions; use 'a painting in the style of {}'-style templates")

