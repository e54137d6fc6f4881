"""Prompts with per-prompt options, and the prompt files that hold them (spec: cli-flags.md §4).

A prompt line carries options after `" --"`: `a cat --n blurry --w 768 --h 512 --s 30 --d 1,2 --l 7`.
Lines and the entries of `.toml` / `.json` prompt files all become one kind of dict, keyed like
sd-scripts' sample prompt dicts (`prompt`, `negative_prompt`, `width`, `height`, `sample_steps`,
`scale`, `seed`, `sample_sampler`...). Only options actually given are present, so a dict is a set of
overrides on top of the command line's defaults (`negative_scale: None` is the explicit `--nl none`).

File formats: `.txt` one prompt per line (empty lines and lines starting with `#` skipped); `.toml`
a `[prompt]` table of defaults merged into each `[[prompt.subset]]`; `.json` a list of strings
and/or dicts. No torch here.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Callable, Optional

from library.errors import UserError

logger = logging.getLogger(__name__)


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _optional_float(text: str) -> Optional[float]:
    return None if text.strip().lower() == "none" else float(text)


def _steps(text: str) -> int:
    return max(1, min(1000, int(text)))


def _text(text: str) -> str:
    return text.strip()


# in-prompt option → (dict key, converter). "d" gives a list of seeds (one per image).
OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "n": ("negative_prompt", _text),
    "w": ("width", int),
    "h": ("height", int),
    "ow": ("original_width", int),
    "oh": ("original_height", int),
    "nw": ("original_width_negative", int),
    "nh": ("original_height_negative", int),
    "ct": ("crop_top", int),
    "cl": ("crop_left", int),
    "s": ("sample_steps", _steps),
    "d": ("seeds", _int_list),
    "l": ("scale", float),
    "nl": ("negative_scale", _optional_float),
    "t": ("strength", float),
    "am": ("network_muls", _float_list),
    "ss": ("sample_sampler", _text),
    "f": ("filename", _text),
    "c": ("clip_prompt", _text),  # read for compatibility; not used (no CLIP guidance)
    "cn": ("controlnet_image", _text),  # guide image of ControlNet-LLLite training samples
}
# sd-scripts options this generator does not implement (Deep Shrink, Gradual Latent, DiT): logged and ignored.
UNSUPPORTED = {"dsd1", "dst1", "dsd2", "dst2", "dsr", "glt", "glr", "gle", "gls", "glsn", "glus", "g", "ctr",
               "rcfg", "fs"}

# dict keys a prompt file entry may use (sd-scripts' names plus the in-prompt options above)
KNOWN_KEYS = {key for key, _ in OPTIONS.values()} | {"prompt", "seed", "enum"}

_OPTION_RE = re.compile(r"^([A-Za-z0-9]+)(?:\s+(.*))?$", re.DOTALL)


def parse_prompt_line(line: str, source: str = "prompt") -> dict:
    """`"a cat --n dog --w 768"` → {"prompt": "a cat", "negative_prompt": "dog", "width": 768}.

    Options are split on `" --"`, names are case-insensitive; a value that does not convert, or an
    unknown option, is logged and skipped (as sd-scripts does) instead of stopping a long run.
    """
    pieces = line.strip().split(" --")
    result: dict = {"prompt": pieces[0].strip()}
    for piece in pieces[1:]:
        match = _OPTION_RE.match(piece.strip())
        name = match.group(1).lower() if match else ""
        if name in UNSUPPORTED:
            logger.warning("%s: option --%s is not supported by this generator; ignored", source, name)
            continue
        if name not in OPTIONS or match.group(2) is None:
            logger.warning("%s: cannot read option '--%s'; ignored", source, piece.strip())
            continue
        key, convert = OPTIONS[name]
        try:
            result[key] = convert(match.group(2))
        except ValueError:
            logger.warning("%s: bad value in option '--%s'; ignored", source, piece.strip())
    return result


def normalize_entry(entry: Any, source: str) -> dict:
    """A prompt file entry (a line or a dict) → prompt dict; `seed` (one int) becomes `seeds`."""
    if isinstance(entry, str):
        return parse_prompt_line(entry, source)
    if not isinstance(entry, dict):
        raise UserError(f"{source}: each prompt must be a string or a table/object, not {type(entry).__name__}")
    result = dict(entry)
    if not isinstance(result.get("prompt", ""), str):
        raise UserError(f"{source}: 'prompt' must be a string")
    result.setdefault("prompt", "")
    unknown = sorted(set(result) - KNOWN_KEYS)
    if unknown:
        logger.warning("%s: unknown prompt keys %s ignored", source, ", ".join(unknown))
    seed = result.pop("seed", None)
    if seed is not None and "seeds" not in result:
        result["seeds"] = [seed]
    if isinstance(result.get("seeds"), int):
        result["seeds"] = [result["seeds"]]
    _check_types(result, source)
    return result


_INT_KEYS = {"width", "height", "sample_steps", "original_width", "original_height", "original_width_negative",
             "original_height_negative", "crop_top", "crop_left"}
_NUMBER_KEYS = {"scale", "strength", "negative_scale"}


def _check_types(entry: dict, source: str) -> None:
    """Values of a TOML/JSON entry are used as they are, so wrong types are caught here, naming the key."""
    for key, value in entry.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key in _INT_KEYS and not (number and float(value).is_integer()):
            raise UserError(f"{source}: {key} must be a whole number, not {value!r}")
        if key in _NUMBER_KEYS and not (number or (key == "negative_scale" and value is None)):
            raise UserError(f"{source}: {key} must be a number, not {value!r}")
        if key in ("seeds", "network_muls") and not (isinstance(value, list) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise UserError(f"{source}: {key} must be a number or a list of numbers, not {value!r}")
    for key in _INT_KEYS & set(entry):
        entry[key] = int(entry[key])


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: prompt file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the prompt file ({e})") from None


def _toml_entries(path: str, text: str) -> list:
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    table = data.get("prompt")
    if not isinstance(table, dict) or not isinstance(table.get("subset", []), list):
        raise UserError(f"{path}: expected a [prompt] table with [[prompt.subset]] entries")
    defaults = {k: v for k, v in table.items() if k != "subset"}
    subsets = table.get("subset") or [{}]
    return [{**defaults, **subset} for subset in subsets]


def text_lines(text: str) -> list[str]:
    """Prompt lines of a .txt file: not empty, not starting with '#'."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def load_prompt_file(path: str) -> list[dict]:
    """Read a .txt / .toml / .json prompt file → list of prompt dicts, each with its index as `enum`."""
    text = _read_text(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".toml":
        entries = _toml_entries(path, text)
    elif ext == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(entries, list):
            raise UserError(f"{path}: expected a JSON list of prompts (strings or objects)")
    else:
        entries = text_lines(text)
    prompts = []
    for index, entry in enumerate(entries):
        prompt = normalize_entry(entry, f"{path} (prompt {index + 1})")
        prompt["enum"] = index
        prompts.append(prompt)
    return prompts


# ---------------------------------------------------------------------------------------------
# gen_img: where prompts come from, and each image's settings and seed


def iter_prompt_entries(args, images: list, stdin=None):
    """Prompt dicts from --interactive (stdin, read lazily), --from_file, --prompt, or the PNG text of
    the --image_path images (sd-scripts' img2img without a prompt)."""
    import sys

    if args.interactive:
        stdin = stdin or sys.stdin
        while True:
            print("Type prompt (end with Ctrl-D):", file=sys.stderr, flush=True)
            line = stdin.readline()
            if not line:
                return
            if line.split(" --")[0].strip():
                yield parse_prompt_line(line, "prompt")
    elif args.from_file:
        yield from load_prompt_file(args.from_file)
    elif args.prompt is not None:
        yield parse_prompt_line(args.prompt, "--prompt")
    elif images:
        from library.generation.png_info import read_png_info

        for image in images:
            info = read_png_info(image)
            if not info.get("prompt"):
                raise UserError(f"{image.filename}: no prompt given and none stored in the image; pass --prompt")
            yield {"prompt": info["prompt"], "negative_prompt": info.get("negative_prompt", "")}
    else:
        raise UserError("no prompt: pass --prompt, --from_file or --interactive")


def multiple_of_8(value: int, what: str) -> int:
    """Sizes are floored to a multiple of 8, at least 64 (with a warning when that changes them)."""
    fixed = max(64, int(value) - int(value) % 8)
    if fixed != value:
        logger.warning("%s %s is not a multiple of 8 (at least 64); using %d", what, value, fixed)
    return fixed


def image_settings(entry: dict, args, sdxl: bool, image_size: Optional[tuple] = None) -> dict:
    """One image's settings (the fields of `generation.BatchSettings`): prompt options over flags.

    Size: `--w/--h`, else `--W/--H`, else the img2img source's size, else 512 (SDXL 1024).
    """
    from library.generation.samplers import check_sampler

    default = 1024 if sdxl else 512
    width = entry.get("width") or args.W or (image_size[0] if image_size else default)
    height = entry.get("height") or args.H or (image_size[1] if image_size else default)
    width, height = multiple_of_8(width, "width"), multiple_of_8(height, "height")

    def pair(h_key, w_key, h_flag, w_flag):
        h, w = entry.get(h_key, getattr(args, h_flag)), entry.get(w_key, getattr(args, w_flag))
        return (h or height, w or width) if sdxl and (h or w) else None

    crop = (entry.get("crop_top", args.crop_top) or 0, entry.get("crop_left", args.crop_left) or 0)
    return dict(
        width=width, height=height, steps=entry.get("sample_steps", args.steps), scale=entry.get("scale", args.scale),
        negative_scale=entry["negative_scale"] if "negative_scale" in entry else args.negative_scale,
        strength=entry.get("strength", 0.8 if args.strength is None else args.strength),
        sampler=check_sampler(entry.get("sample_sampler"), "--ss") or args.sampler,
        original_size=pair("original_height", "original_width", "original_height", "original_width"),
        original_size_negative=pair("original_height_negative", "original_width_negative",
                                    "original_height_negative", "original_width_negative"),
        crop=crop if sdxl else (0, 0),
        network_muls=tuple(entry["network_muls"]) if entry.get("network_muls") else None,
    )


class SeedPlan:
    """sd-scripts' seeds: `--d` seeds first; then `--iter_same_seed`'s per-iteration seed; a run of exactly
    one image uses `--seed` itself; otherwise seeds are drawn from a generator seeded with `--seed`."""

    def __init__(self, seed: Optional[int], single_image: bool):
        import random

        self.seed = seed
        self.single_image = single_image
        self.random = random.Random(seed)

    def iteration_seed(self, same_seed: bool) -> Optional[int]:
        return self.random.randint(0, 2**32 - 1) if same_seed else None

    def seed_for(self, explicit: list, k: int, iteration_seed: Optional[int]) -> int:
        if k < len(explicit):
            return int(explicit[k])
        if iteration_seed is not None:
            return iteration_seed
        if self.single_image and self.seed is not None:
            return self.seed
        return self.random.randint(0, 2**32 - 1)


def dynamic_prompt(prompt: str, seed: int) -> str:
    """`{a|b|c}` → one alternative, picked by the image's seed (so a seed reproduces its prompt)."""
    if "{" not in prompt:
        return prompt
    import random

    from library.text.prompt_syntax import expand_wildcards

    return expand_wildcards(prompt, random.Random(seed))
