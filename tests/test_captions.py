"""Caption transforms (text-encoding.md §5) and the prompt syntax: weights (§6) and wildcards."""

import random

import pytest

from library.data.captions import process_caption, warmup_token_count
from library.data.config import SubsetParams
from library.text.prompt_syntax import parse_prompt_attention, parse_weighted_caption


def run(caption, epoch=1, seed=0, **params):
    return process_caption(caption, SubsetParams(**params), epoch, random.Random(seed))


# --- process_caption, step by step ---------------------------------------------------------------


def test_untouched_caption_passes_through():
    assert run("a cat, sitting") == "a cat, sitting"


def test_prefix_and_suffix_are_joined_with_a_space():
    assert run("a cat", caption_prefix="photo of", caption_suffix="best quality") == "photo of a cat best quality"


def test_dropout_rate_uses_one_draw_from_the_rng():
    # Random(0).random() = 0.844 (kept at rate 0.5), Random(1).random() = 0.134 (dropped)
    assert run("a cat", seed=0, caption_dropout_rate=0.5) == "a cat"
    assert run("a cat", seed=1, caption_dropout_rate=0.5) == ""


def test_dropout_every_n_epochs_uses_the_one_based_epoch():
    assert run("a cat", epoch=2, caption_dropout_every_n_epochs=2) == ""
    assert run("a cat", epoch=3, caption_dropout_every_n_epochs=2) == "a cat"


def test_dropped_caption_skips_every_later_step():
    subset = SubsetParams(caption_dropout_rate=1.0, caption_prefix="p")
    out = process_caption("a", subset, 1, random.Random(0), replacements={"": "replaced"})
    assert out == ""


def test_without_wildcards_only_the_first_line_is_used():
    assert run("first line\nsecond line") == "first line"
    # braces are literal text without enable_wildcard
    assert run("a {b|c}") == "a {b|c}"


def test_wildcards_pick_alternatives_deterministically():
    assert run("a {red|green|blue} {cat|dog}", seed=3, enable_wildcard=True) == "a red cat"
    assert run("line one {a|b}\nline two {c|d}", seed=3, enable_wildcard=True) == "line one a"


def test_wildcard_escaped_braces_stay_literal():
    assert run("{{x}} {y|y}", enable_wildcard=True) == "{x} y"


def test_shuffle_keeps_the_first_keep_tokens_in_place():
    # Random(0).shuffle(["b","c","d","e"]) -> ["d","b","c","e"]
    assert run("a, b, c, d, e", shuffle_caption=True, keep_tokens=1) == "a, d, b, c, e"


def test_keep_tokens_separator_fixes_head_and_tail():
    out = run("x, y ||| b, c, d ||| z", shuffle_caption=True, keep_tokens_separator="|||")
    assert out == "x, y, b, d, c, z"


def test_keep_tokens_separator_is_removed_even_without_shuffle():
    # sd-scripts leaves "|||" in the caption here (listed bug); we always split and re-join.
    assert run("x, y ||| b, c", keep_tokens_separator="|||") == "x, y, b, c"
    # a caption without the marker is not touched
    assert run("x,y", keep_tokens_separator="|||") == "x,y"


def test_tokens_are_rejoined_with_comma_space_whatever_the_separator():
    assert run("a;b;c", caption_separator=";", token_warmup_step=1, token_warmup_min=3) == "a, b, c"


def test_empty_pieces_are_kept_without_a_marker():
    out = run("a,,b", caption_tag_dropout_rate=0.0, shuffle_caption=True)
    assert sorted(out.split(", ")) == ["", "a", "b"]


def test_tag_dropout_draws_once_per_flexible_token():
    # draws for Random(0): .844 .758 .421 .259 .511 .405 -> c, d and f are dropped at rate 0.5
    assert run("a, b, c, d, e, f", caption_tag_dropout_rate=0.5) == "a, b, e"
    assert run("a, b, c", caption_tag_dropout_rate=1.0, keep_tokens=1) == "a"


@pytest.mark.parametrize(
    "step, expected", [(0, "a"), (5, "a, b, c"), (9, "a, b, c, d"), (10, "a, b, c, d, e")]
)
def test_token_warmup_grows_the_caption(step, expected):
    subset = SubsetParams(token_warmup_step=10, token_warmup_min=1)
    assert process_caption("a, b, c, d, e", subset, 1, random.Random(0), current_step=step) == expected


def test_token_warmup_fraction_is_relative_to_max_train_steps():
    subset = SubsetParams(token_warmup_step=0.5, token_warmup_min=1)
    out = process_caption("a, b, c, d, e", subset, 1, random.Random(0), current_step=5, max_train_steps=20)
    assert out == "a, b, c"  # 0.5 * 20 = 10 steps, floor(5 * 4 / 10) + 1 = 3
    assert warmup_token_count(5, 1, 0.5, 10, 20) is None


def test_secondary_separator_groups_move_together_when_shuffled():
    out = run("a::b, c, d", seed=1, shuffle_caption=True, secondary_separator="::")
    assert out == "c, d, a,b"


def test_replacements_substring_and_whole_caption():
    subset = SubsetParams()
    assert process_caption("a sks toy", subset, 1, random.Random(0), replacements={"sks": "sks sks1"}) == "a sks sks1 toy"
    whole = process_caption("ignored", subset, 1, random.Random(0), replacements={"": ["t1", "t2", "t3"]})
    assert whole == random.Random(0).choice(["t1", "t2", "t3"])


def test_same_seed_same_caption():
    params = dict(shuffle_caption=True, caption_tag_dropout_rate=0.3, enable_wildcard=True)
    caption = "{a|b}, c, d, e, f, g"
    assert run(caption, seed=42, **params) == run(caption, seed=42, **params)


# --- prompt weighting ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(a:1.3)", [("a", 1.3)]),
        ("((x))", [("x", 1.1 * 1.1)]),
        ("[x]", [("x", 1 / 1.1)]),
        ("(a [b] c)", [("a ", 1.1), ("b", (1 / 1.1) * 1.1), (" c", 1.1)]),
        ("(a:-0.5) b", [("a", -0.5), (" b", 1.0)]),
        (r"\(x\) \\ y", [("(x) \\ y", 1.0)]),
        ("(x", [("x", 1.1)]),  # unclosed group closes at the end
        ("[x", [("x", 1 / 1.1)]),
        ("a) b: c", [("a) b: c", 1.0)]),  # stray closer and plain colon are text
        ("", [("", 1.0)]),
    ],
)
def test_parse_prompt_attention(text, expected):
    assert parse_prompt_attention(text) == expected


def test_nested_weights_multiply():
    assert parse_prompt_attention("((a:2))")[0] == ("a", 2 * 1.1)


def test_parse_weighted_caption_returns_parallel_lists():
    assert parse_weighted_caption("a (b:1.5) c") == (["a ", "b", " c"], [1.0, 1.5, 1.0])
