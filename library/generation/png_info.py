"""Generation settings in PNG text chunks, and output file names.

Written into every image:
* `parameters` — the AUTOMATIC1111 text that image viewers and sites read:
      <prompt>
      Negative prompt: <negative prompt>
      Steps: 30, Sampler: euler_a, CFG scale: 7.5, Seed: 42, Size: 512x768, Model: mymodel
  Values with a comma, colon or quote are written as JSON strings, so `parse_parameters` gives back
  exactly what was written.
* sd-scripts' own chunks (`prompt`, `negative-prompt`, `seed`, `sampler`, `steps`, `scale`,
  `negative-scale`, SDXL `original-height`...), which its img2img mode reads prompts from.

File names follow sd-scripts: `im_<YYYYmmddHHMMSS>_<hires prefix><index:03d>_<seed>.png`, or
`im_<hires prefix><number:06d>.png` with `--sequential_file_name`; an existing file is never
overwritten (`_1`, `_2`... is appended). No torch here.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

# settings key → A1111 label, in the order they are written. Sizes are "WxH" as in A1111's "Size".
LABELS = {
    "steps": "Steps",
    "sampler": "Sampler",
    "scale": "CFG scale",
    "negative_scale": "Negative scale",
    "seed": "Seed",
    "size": "Size",
    "strength": "Denoising strength",
    "clip_skip": "Clip skip",
    "hires_scale": "Hires upscale",
    "hires_steps": "Hires steps",
    "original_size": "Original size",
    "original_size_negative": "Negative original size",
    "crop_top": "Crop top",
    "crop_left": "Crop left",
    "networks": "Networks",
    "control_nets": "ControlNet-LLLite",
    "guide_images": "Guide image",
    "model": "Model",
}
_KEY_BY_LABEL = {label: key for key, label in LABELS.items()}
# "size" keys ↔ (width key, height key)
_SIZES = {
    "size": ("width", "height"),
    "original_size": ("original_width", "original_height"),
    "original_size_negative": ("original_width_negative", "original_height_negative"),
}
_NEGATIVE = "Negative prompt: "
# A1111's reader: `label: value` pairs, a value is a JSON-quoted string or runs to the next comma.
_PAIR_RE = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_NEEDS_QUOTES = re.compile(r'[,:"\n]')
_INT_KEYS = {"steps", "seed", "clip_skip", "hires_steps", "crop_top", "crop_left"}
_FLOAT_KEYS = {"scale", "negative_scale", "strength", "hires_scale"}


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if _NEEDS_QUOTES.search(text) or text != text.strip() else text


def _with_sizes(info: dict) -> dict:
    out = dict(info)
    for key, (w, h) in _SIZES.items():
        if out.get(w) is not None and out.get(h) is not None:
            out[key] = f"{out[w]}x{out[h]}"
    return out


def format_parameters(info: dict) -> str:
    """A1111 `parameters` text from {prompt, negative_prompt, steps, sampler, scale, seed, width, height, ...}."""
    info = _with_sizes(info)
    lines = [info.get("prompt", "")]
    if info.get("negative_prompt"):
        lines.append(_NEGATIVE + info["negative_prompt"])
    pairs = [f"{label}: {_quote(info[key])}" for key, label in LABELS.items() if info.get(key) is not None]
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def _convert(key: str, text: str):
    try:
        if key in _INT_KEYS:
            return int(text)
        if key in _FLOAT_KEYS:
            return float(text)
    except ValueError:
        pass
    return text


def parse_parameters(text: str) -> dict:
    """Inverse of `format_parameters` (also reads A1111's own text; unknown labels are kept as they are)."""
    lines = text.split("\n")
    pairs = _PAIR_RE.findall(lines[-1]) if len(lines) > 1 else []
    body = lines[:-1] if pairs else lines
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in body:
        if line.startswith(_NEGATIVE) and not in_negative:
            in_negative = True
            line = line[len(_NEGATIVE):]
        (negative_lines if in_negative else prompt_lines).append(line)
    info: dict = {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(negative_lines)}
    for label, raw in pairs:
        value = json.loads(raw) if raw.startswith('"') else raw.strip()
        key = _KEY_BY_LABEL.get(label.strip(), label.strip())
        info[key] = _convert(key, value)
    for key, (w, h) in _SIZES.items():
        if isinstance(info.get(key), str) and re.fullmatch(r"\d+x\d+", info[key]):
            info[w], info[h] = (int(v) for v in info.pop(key).split("x"))
    return info


def sd_scripts_chunks(info: dict) -> dict:
    """The text chunks sd-scripts' gen_img writes (and its img2img mode reads back)."""
    chunks = {"prompt": info.get("prompt", "")}
    names = [("negative_prompt", "negative-prompt"), ("seed", "seed"), ("sampler", "sampler"), ("steps", "steps"),
             ("scale", "scale"), ("negative_scale", "negative-scale"), ("original_height", "original-height"),
             ("original_width", "original-width"), ("original_height_negative", "original-height-negative"),
             ("original_width_negative", "original-width-negative"), ("crop_top", "crop-top"),
             ("crop_left", "crop-left")]
    for key, chunk in names:
        if info.get(key) is not None:
            chunks[chunk] = str(info[key])
    return chunks


def save_png(image, path: str, info: dict) -> None:
    """Save a PIL image with the `parameters` chunk and sd-scripts' chunks."""
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text("parameters", format_parameters(info))
    for key, value in sd_scripts_chunks(info).items():
        meta.add_text(key, value)
    image.save(path, pnginfo=meta)


def read_png_info(path_or_image) -> dict:
    """Settings of an image written by us, by A1111 (`parameters`) or by sd-scripts (its own chunks)."""
    from PIL import Image

    image = Image.open(path_or_image) if isinstance(path_or_image, str) else path_or_image
    text = getattr(image, "text", None) or image.info or {}
    if "parameters" in text:
        return parse_parameters(text["parameters"])
    if "prompt" in text:
        info = {"prompt": text["prompt"], "negative_prompt": text.get("negative-prompt", "")}
        for key, chunk in (("seed", "seed"), ("steps", "steps"), ("scale", "scale"), ("sampler", "sampler"),
                           ("negative_scale", "negative-scale")):
            if chunk in text:
                info[key] = _convert(key, text[chunk])
        return info
    return {}


def first_available(folder: str, name: str) -> str:
    """`name` if free in `folder`, else `<stem>_1<ext>`, `<stem>_2<ext>`... (never overwrites)."""
    if not os.path.exists(os.path.join(folder, name)):
        return name
    stem, ext = os.path.splitext(name)
    i = 1
    while os.path.exists(os.path.join(folder, f"{stem}_{i}{ext}")):
        i += 1
    return f"{stem}_{i}{ext}"


def output_name(
    timestamp: str, seed: int, index_in_batch: int, number: int, *, sequential: bool, hires_prefix: str = "",
    original: Optional[str] = None, explicit: Optional[str] = None,
) -> str:
    """The file name of one generated image (before `first_available`)."""
    if explicit:
        return explicit if os.path.splitext(explicit)[1] else explicit + ".png"
    if original:
        return os.path.splitext(os.path.basename(original))[0] + ".png"
    if sequential:
        return f"im_{hires_prefix}{number:06d}.png"
    return f"im_{timestamp}_{hires_prefix}{index_in_batch:03d}_{seed}.png"


def image_info(job, settings, *, sdxl: bool, model: str, clip_skip=None, hires=None, networks: str = None,
               control_nets=()) -> dict:
    """The settings dict written for one generated image (`job`: generation.ImageJob, `settings`: BatchSettings,
    `control_nets`: the engine's ControlNet-LLLite models, recorded with the job's guide images)."""
    info = dict(prompt=job.prompt, negative_prompt=job.negative_prompt, seed=job.seed, sampler=settings.sampler,
                steps=settings.steps, scale=settings.scale, negative_scale=settings.negative_scale,
                width=settings.width, height=settings.height, clip_skip=clip_skip, model=model, networks=networks)
    guides = getattr(job, "guide_images", ())
    if control_nets and guides:
        info["control_nets"] = ", ".join(control.describe() for control in control_nets)  # name:multiplier:ratio
        info["guide_images"] = ", ".join(os.path.basename(getattr(g, "filename", "") or "?") for g in guides)
    if job.init_image is not None or job.init_latents is not None:
        info["strength"] = settings.strength
    if hires is not None:
        info.update(hires_scale=hires.scale, hires_steps=hires.steps)
    if sdxl:
        oh, ow = settings.original_size or (settings.height, settings.width)
        nh, nw = settings.original_size_negative or (oh, ow)
        info.update(original_height=oh, original_width=ow, original_height_negative=nh, original_width_negative=nw,
                    crop_top=settings.crop[0], crop_left=settings.crop[1])
    return info
