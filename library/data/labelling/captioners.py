"""BLIP and GIT captioners on transformers, loaded from local files only.

* BLIP: `BlipForConditionalGeneration` + `BlipProcessor` from a transformers folder (e.g.
  Salesforce/blip-image-captioning-large), a Hub id already in the local Hugging Face cache, or
  sd-scripts' `.pth` (converted by `blip_checkpoint`; sd-scripts' default URL is looked up where it
  cached the file, `<torch hub dir>/checkpoints/`). Captions start from the prompt "a picture of",
  which is cut from the text, as sd-scripts did. Nucleus sampling uses sd-scripts' repetition
  penalty 1.1 and transformers' top-k 50; beam search penalty 1.0. `max_length`/`min_length` count
  the prompt's tokens too, as in sd-scripts.
* GIT: `AutoModelForCausalLM` + `AutoProcessor` from a folder or a cached Hub id
  (microsoft/git-large-textcaps); decoding follows the checkpoint's generation config (greedy for
  the published ones) with `max_length`.

Images are read with `library.data.image_files` (EXIF orientation applied, transparency composited
onto white) and prepared by the model's own processor in the DataLoader workers (`PrepareForCaptioner`
is picklable). The model runs in float32 on CUDA, else XPU, else MPS, else the CPU.
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import urlparse

from library.errors import UserError

logger = logging.getLogger(__name__)

BLIP_URL = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large_caption.pth"
BLIP_HUB_ID = "Salesforce/blip-image-captioning-large"
GIT_HUB_ID = "microsoft/git-large-textcaps"
BLIP_PROMPT = "a picture of"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def preferred_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _download_hint(hub_id: str, flag: str) -> str:
    folder = os.path.join("models", hub_id.split("/")[-1])
    return (f"download it with `hf download {hub_id} --local-dir {folder}` and pass {flag} {folder} "
            "(nothing is downloaded at run time)")


def from_local(cls, name: str, flag: str, default_hub_id: str):
    """`cls.from_pretrained` of a folder, or of a Hub id found in the local cache; else one UserError line."""
    if not os.path.isdir(name) and not _HUB_ID.match(name):
        raise UserError(f"{flag} {name}: no such folder; {_download_hint(default_hub_id, flag)}")
    try:
        return cls.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as e:
        where = f"{name} is not a complete model folder ({str(e).splitlines()[0]})" if os.path.isdir(name) else \
            f"{name} is not in the local Hugging Face cache"
        raise UserError(f"{flag} {where}; {_download_hint(name if _HUB_ID.match(name) else default_hub_id, flag)}") \
            from None


class PrepareForCaptioner:
    """Picklable `path → (pixel_values [3, H, W], (w, h))` with the model's image processor."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, path: str):
        from library.data.image_files import load_image_rgb

        rgb = load_image_rgb(path, background=(255, 255, 255))
        pixels = self.image_processor(images=rgb, return_tensors="pt")["pixel_values"][0]
        return pixels, (rgb.shape[1], rgb.shape[0])


class Captioner:
    """A model, its processor and the generation settings; `caption(pixel_values)` → texts."""

    def __init__(self, model, processor, generate_kwargs: dict, device):
        import torch

        self.device = device
        self.model = model.to(device=device, dtype=torch.float32).eval()
        self.processor = processor
        self.generate_kwargs = generate_kwargs
        self.prepare = PrepareForCaptioner(processor.image_processor)

    def _generate(self, pixel_values):
        return self.model.generate(pixel_values=pixel_values, **self.generate_kwargs)

    def caption(self, pixel_values) -> list:
        import torch

        with torch.no_grad():
            ids = self._generate(pixel_values.to(self.device, torch.float32))
        return [self.finish(text) for text in self.processor.batch_decode(ids, skip_special_tokens=True)]

    def finish(self, text: str) -> str:
        return text.strip()


class BlipCaptioner(Captioner):
    def _generate(self, pixel_values):
        prompt = self.processor.tokenizer([BLIP_PROMPT] * len(pixel_values), return_tensors="pt")
        return self.model.generate(pixel_values=pixel_values, input_ids=prompt["input_ids"].to(self.device),
                                   **self.generate_kwargs)

    def finish(self, text: str) -> str:
        text = text.strip()
        return text[len(BLIP_PROMPT):].strip() if text.startswith(BLIP_PROMPT) else text


def blip_generate_kwargs(*, beam_search: bool, num_beams: int, top_p: float, max_length: int, min_length: int) -> dict:
    if min_length > max_length:
        raise UserError(f"--min_length {min_length} is more than --max_length {max_length}")
    if beam_search:
        if num_beams < 1:
            raise UserError(f"--num_beams {num_beams}: must be at least 1")
        return dict(do_sample=False, num_beams=num_beams, max_length=max_length, min_length=min_length,
                    repetition_penalty=1.0)
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"--top_p {top_p}: must be above 0 and at most 1")
    return dict(do_sample=True, top_p=top_p, top_k=50, num_beams=1, max_length=max_length, min_length=min_length,
                repetition_penalty=1.1)


def _cached_url_file(url: str) -> str:
    """Where sd-scripts (timm's download_cached_file) kept a downloaded checkpoint."""
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def load_blip(weights: str, generate_kwargs: dict) -> BlipCaptioner:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from library.data.labelling.blip_checkpoint import load_blip_checkpoint

    if weights.startswith(("http://", "https://")):
        cached = _cached_url_file(weights)
        if not os.path.isfile(cached):
            raise UserError(f"--caption_weights {weights} is not on this machine (looked for {cached}); "
                            f"{_download_hint(BLIP_HUB_ID, '--caption_weights')}, or download that file to {cached}")
        weights = cached
    if os.path.isfile(weights):
        logger.info(f"loading BLIP from {weights} (sd-scripts checkpoint, converted)")
        model, processor = load_blip_checkpoint(weights)
    else:
        logger.info(f"loading BLIP from {weights}")
        model = from_local(BlipForConditionalGeneration, weights, "--caption_weights", BLIP_HUB_ID)
        processor = from_local(BlipProcessor, weights, "--caption_weights", BLIP_HUB_ID)
    return BlipCaptioner(model, processor, generate_kwargs, preferred_device())


# TextCaps-trained GIT models often read text that is not there ("with the words ..."); --remove_words
# deletes these phrases (the phrases sd-scripts removes), then tidies the spaces left behind.
_TEXT_READING = [re.compile(p) for p in (
    r'(?:has|with|and) the (?:words?|letters?|name) (?:" ?[^"]*"|\w+)(?: ?(?:is )?(?:on|in) (?:the |her |their |him )?\w+)?',
    r'(?:with a sign )?that says ?(?:" ?[^"]*"|\w+)(?: ?on it)?',
    r"(?:with a sign )?that says ?(?:' ?(?:i'm)?[^']*'|\w+)(?: ?on it)?",
    r"with the number \d+ on (?:it|\w+ \w+)",
    r'with the words "',
    r"word \w+ on it",
    r"that says the word \w+ on it",
    r"that says'the word \"(?: on it)?",
)]


def remove_text_reading(caption: str) -> str:
    for pattern in _TEXT_READING:
        caption = pattern.sub("", caption)
    return re.sub(r"\s+", " ", caption).strip()


class GitCaptioner(Captioner):
    def __init__(self, *args, remove_words: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.remove_words = remove_words

    def finish(self, text: str) -> str:
        text = text.strip()
        return remove_text_reading(text) if self.remove_words else text


def load_git(model_id: str, max_length: int, remove_words: bool) -> GitCaptioner:
    from transformers import AutoModelForCausalLM, AutoProcessor

    logger.info(f"loading GIT from {model_id}")
    model = from_local(AutoModelForCausalLM, model_id, "--model_id", GIT_HUB_ID)
    processor = from_local(AutoProcessor, model_id, "--model_id", GIT_HUB_ID)
    return GitCaptioner(model, processor, dict(max_length=max_length), preferred_device(), remove_words=remove_words)
