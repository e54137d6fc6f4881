"""The prompt syntax shared by captions and generation prompts: wildcards and A1111-style weights.

* `expand_wildcards`: one line of a multi-line caption, then `{a|b|c}` replaced by one alternative
  (`{{` / `}}` are literal braces); captions at every fetch and generation prompts use it.
* `parse_prompt_attention` / `parse_weighted_caption`: `(x)`, `[x]`, `(x:1.3)` and escapes, for
  `--weighted_captions` training and for the generators.

Standard library only: this runs in data-loader workers and before any model is loaded.
"""

from __future__ import annotations

import random
import re
from typing import Optional

# Matches one wildcard group `{a|b|c}`; `{{` / `}}` are escaped before this runs.
_WILDCARD_RE = re.compile(r"\{([^}]+)\}")


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """Pick one line of a multi-line caption, then replace each `{a|b}` by one alternative.

    `{{` and `}}` stand for literal braces.
    """
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))

    # Placeholders that cannot occur in the caption protect escaped braces from the regex.
    open_mark, close_mark = "\u2985", "\u2986"
    while open_mark in caption or close_mark in caption:
        open_mark += "\u2985"
        close_mark += "\u2986"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD_RE.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


# --- prompt weighting -------------------------------------------------------------------------

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1

# One token of the weighting syntax: escapes, brackets, ":<number>)" closers, plain text, a lone ":".
_ATTENTION_RE = re.compile(
    r"""
    \\\(      | \\\)      | \\\[      | \\\]      | \\\\      | \\
    | \(      | \[
    | :(?P<weight>[+-]?[.\d]+)\)
    | \)      | \]
    | [^\\()\[\]:]+
    | :
    """,
    re.VERBOSE,
)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) fragments.

    `(x)` ×1.1, `[x]` ÷1.1, `(x:w)` ×w, nested groups multiply, `\\(` etc. are literal, unclosed
    groups close at the end with their default multiplier, adjacent equal weights merge, and an
    empty prompt gives [("", 1.0)].
    """
    fragments: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in _ATTENTION_RE.finditer(text):
        token = match.group(0)
        weight = _parse_weight(match.group("weight"))
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(fragments))
        elif token == "[":
            open_square.append(len(fragments))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), weight)
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_BRACKET_MULTIPLIER)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            fragments.append([token, 1.0])

    for start in open_round:
        scale_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_BRACKET_MULTIPLIER)

    if not fragments:
        return [("", 1.0)]
    return _merge_equal_weights(fragments)


def _parse_weight(raw: Optional[str]) -> Optional[float]:
    # The pattern allows things like "1..2"; those are kept as text instead of crashing.
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        return None


def _merge_equal_weights(fragments: list[list]) -> list[tuple[str, float]]:
    merged: list[list] = [list(fragments[0])]
    for text, weight in fragments[1:]:
        if merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]


def parse_weighted_caption(text: str) -> tuple[list[str], list[float]]:
    """`parse_prompt_attention` as two parallel lists: (text chunks, weights)."""
    pairs = parse_prompt_attention(text)
    return [t for t, _ in pairs], [w for _, w in pairs]
