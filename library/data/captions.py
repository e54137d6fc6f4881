"""Caption transforms applied at every fetch.

`process_caption` turns a stored caption into the text given to the tokenizer, in the order sd-scripts
uses (spec: text-encoding.md §5): prefix/suffix, caption dropout, wildcards or first line,
keep-tokens / token warm-up / shuffle / tag dropout, secondary separator, Textual Inversion
replacements. All randomness comes from the `random.Random` passed in, so a fixed seed gives a fixed
caption.

The prompt syntax shared with the generators (`{a|b}` wildcards, `(x:1.3)` weights) is
`library.text.prompt_syntax`.

No torch here: this runs in data-loader workers and before any model is loaded.
"""

from __future__ import annotations

import math
import random
from typing import Any, Mapping, Optional, Sequence, Union

from library.text.prompt_syntax import expand_wildcards

Replacements = Mapping[str, Union[str, Sequence[str]]]


def process_caption(
    caption: str,
    subset: Any,
    epoch: int,
    rng: random.Random,
    *,
    current_step: int = 0,
    max_train_steps: int = 0,
    replacements: Optional[Replacements] = None,
) -> str:
    """Return the caption to tokenize for one fetch.

    subset: resolved subset parameters (`library.data.config.SubsetParams` or anything with the
    same attribute names). epoch: the 1-based epoch as the dataset sees it (drives
    `caption_dropout_every_n_epochs`). current_step / max_train_steps drive token warm-up.
    replacements: Textual Inversion replacements (key "" replaces the whole caption).
    """
    caption = _add_prefix_suffix(caption, subset.caption_prefix, subset.caption_suffix)

    if _is_dropped(subset, epoch, rng):
        # A dropped caption trains the unconditional embedding: nothing later may add text back.
        return ""

    if subset.enable_wildcard:
        caption = expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    separator = subset.keep_tokens_separator or ""
    needs_token_pass = (
        subset.shuffle_caption
        or subset.token_warmup_step > 0
        or subset.caption_tag_dropout_rate > 0
        # sd-scripts leaves the separator in the text when nothing shuffles; we always remove it.
        or (separator and separator in caption)
    )
    if needs_token_pass:
        caption = _rearrange_tokens(caption, subset, rng, current_step, max_train_steps)

    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)

    if replacements:
        caption = apply_replacements(caption, replacements, rng)
    return caption


def _add_prefix_suffix(caption: str, prefix: Optional[str], suffix: Optional[str]) -> str:
    if prefix:
        caption = prefix + " " + caption
    if suffix:
        caption = caption + " " + suffix
    return caption


def _is_dropped(subset: Any, epoch: int, rng: random.Random) -> bool:
    # The random draw happens only when a rate is set, so enabling every_n alone does not shift
    # the random sequence of later steps.
    if subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate:
        return True
    every_n = subset.caption_dropout_every_n_epochs
    return every_n > 0 and epoch % every_n == 0


def _split_fixed_and_flex(caption: str, subset: Any) -> tuple[list[str], list[str], list[str]]:
    """Split into (fixed prefix tokens, shufflable tokens, fixed suffix tokens)."""
    sep = subset.caption_separator
    marker = subset.keep_tokens_separator or ""

    def pieces(text: str) -> list[str]:
        return [t.strip() for t in text.split(sep) if t.strip()]

    if marker and marker in caption:
        fixed_part, flex_part = caption.split(marker, 1)
        suffix_part = ""
        if marker in flex_part:
            flex_part, suffix_part = flex_part.split(marker, 1)
        return pieces(fixed_part), pieces(flex_part), pieces(suffix_part)

    # Without a marker, empty pieces are kept (sd-scripts behaviour; "a,,b" keeps its gap).
    tokens = [t.strip() for t in caption.strip().split(sep)]
    keep = subset.keep_tokens
    if keep > 0:
        return tokens[:keep], tokens[keep:], []
    return [], tokens, []


def warmup_token_count(
    num_flex: int, token_warmup_min: int, token_warmup_step: float, current_step: int, max_train_steps: int
) -> Optional[int]:
    """How many flexible tokens token warm-up keeps at this step (None = all).

    A `token_warmup_step` below 1 is a fraction of `max_train_steps`.
    """
    steps = token_warmup_step
    if steps < 1:
        steps = math.floor(steps * max_train_steps)
    if not steps or current_step >= steps:
        return None
    return math.floor(current_step * ((num_flex - token_warmup_min) / steps)) + token_warmup_min


def _rearrange_tokens(
    caption: str, subset: Any, rng: random.Random, current_step: int, max_train_steps: int
) -> str:
    fixed, flex, fixed_suffix = _split_fixed_and_flex(caption, subset)

    keep_count = warmup_token_count(
        len(flex), subset.token_warmup_min, subset.token_warmup_step, current_step, max_train_steps
    )
    if keep_count is not None:
        flex = flex[:keep_count]

    if subset.shuffle_caption:
        rng.shuffle(flex)

    rate = subset.caption_tag_dropout_rate
    if rate > 0:
        flex = [token for token in flex if rng.random() >= rate]

    # sd-scripts always re-joins with ", " whatever caption_separator is.
    return ", ".join(fixed + flex + fixed_suffix)


def apply_replacements(caption: str, replacements: Replacements, rng: random.Random) -> str:
    """Textual Inversion replacements: key "" replaces the whole caption (random pick from a list),
    other keys are plain substring replacements, applied in order."""
    for old, new in replacements.items():
        if old == "":
            caption = rng.choice(list(new)) if isinstance(new, (list, tuple)) else new
        else:
            caption = caption.replace(old, new)
    return caption
