"""ModelSpec 1.0.1 metadata (`modelspec.*` keys) written into every safetensors file we save.

Values follow sd-scripts' use of the Stability AI model spec, so tools that read the architecture,
resolution and prediction type from a file (A1111, ComfyUI, model browsers) see the same values.
"""

from __future__ import annotations

import datetime
from typing import Dict, Optional

from library.models.families import ModelFamily

SPEC_VERSION = "1.0.1"
IMPLEMENTATION_VERSION = "sdtrain/0.1.0"


def architecture(family: ModelFamily, v_parameterization: bool, kind: Optional[str] = None) -> str:
    """`kind`: None for a full checkpoint, else "lora", "textual-inversion", "control-net-lllite"."""
    if family.name == "sd2":
        base = "stable-diffusion-v2-768-v" if v_parameterization else "stable-diffusion-v2-512"
    else:
        base = family.modelspec_architecture
    return f"{base}/{kind}" if kind else base


def default_resolution(family: ModelFamily, v_parameterization: bool) -> int:
    if family.is_sdxl:
        return 1024
    return 768 if (family.v2 and v_parameterization) else 512


def build_metadata(
    family: ModelFamily,
    v_parameterization: bool,
    title: str,
    kind: Optional[str] = None,
    resolution: Optional[tuple] = None,
    timestep_range: Optional[tuple] = None,
    clip_skip: Optional[int] = None,
    extra: Optional[Dict[str, Optional[str]]] = None,
) -> Dict[str, str]:
    """`extra`: optional spec fields (author, description, license, tags, merged_from, ...), None values skipped."""
    if resolution is None:
        r = default_resolution(family, v_parameterization)
        resolution = (r, r)
    # what sd-scripts writes: SGM's repository for full checkpoints, embeddings and every SDXL file
    sgm = kind is None or kind == "textual-inversion" or family.is_sdxl
    meta = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": architecture(family, v_parameterization, kind),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if sgm else "diffusers",
        "modelspec.implementation_version": IMPLEMENTATION_VERSION,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
    }
    if timestep_range is not None and any(t is not None for t in timestep_range):
        lo = 0 if timestep_range[0] is None else timestep_range[0]
        hi = 1000 if timestep_range[1] is None else timestep_range[1]
        meta["modelspec.timestep_range"] = f"{lo},{hi}"
    if clip_skip is not None:
        meta["modelspec.encoder_layer"] = str(clip_skip)
    for key, value in (extra or {}).items():
        if value is not None:
            meta[f"modelspec.{key}"] = str(value)
    return meta


def prediction_is_v(metadata: Dict[str, str]) -> Optional[bool]:
    """What a file's own modelspec says about v-prediction, if anything."""
    value = metadata.get("modelspec.prediction_type")
    if value is None:
        return None
    return value == "v"
