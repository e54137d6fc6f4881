"""The text encoders as `--network_module` plugins see them: the classic `text_model.` module path.

transformers 5's `CLIPTextModel` holds the transformer's parts directly (`encoder.layers...`), where
earlier versions had them under `text_model.`. Plugins such as `lycoris.kohya` name their modules by
walking `named_modules()`, so through the plain model they would name them `lora_te_encoder_...` and
find none of a file's `lora_te_text_model_encoder_...` modules. The trainer (library/training/task_network.py)
and the generator (library/generation/loading.py) both hand plugins the encoders through this view;
our own `networks.*` modules name text-encoder modules themselves and get the models as they are.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch


class ClassicTextEncoderView(torch.nn.Module):
    """A transformers-5 `CLIPTextModel` seen under the classic `text_model.` module path.

    Plugins name their modules by walking `named_modules()`; through this view they produce the
    `lora_te_text_model_encoder_...` names every other tool expects. The view owns no weights:
    patching its modules patches the real encoder."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.text_model = encoder

    def forward(self, *args, **kwargs):
        return self.text_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["text_model"], name)


def classic_view(encoder: torch.nn.Module) -> torch.nn.Module:
    return encoder if hasattr(encoder, "text_model") else ClassicTextEncoderView(encoder)


def plugin_text_encoders(module_name: str, encoders: Sequence[torch.nn.Module]) -> Union[torch.nn.Module, list]:
    """The `text_encoder` argument of a plugin's functions, as sd-scripts passes it: one model for SD1/SD2,
    a list for SDXL; in the classic view unless the plugin is one of our `networks.*` modules."""
    if not module_name.startswith("networks."):
        encoders = [classic_view(encoder) for encoder in encoders]
    return list(encoders) if len(encoders) > 1 else encoders[0]
