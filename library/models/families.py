"""Model families: what distinguishes SD1.x, SD2.x (512 eps / 768 v) and SDXL base.

Every difference between the families that the rest of the code needs is data held here: the text
encoders and where they live in a single-file checkpoint, the latent scale, the tokenizer padding,
the rule for attention heads (not visible in tensor shapes) and reference configs at full and tiny
size. Code paths are shared; they read these fields instead of branching on the family name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from library.errors import UserError


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family.

    kind: "clip" (HF CLIP layout, stored as is in single files) or "openclip" (OpenCLIP text tower,
    converted to and from HF CLIP). with_projection: built as CLIPTextModelWithProjection.
    """

    role: str  # "clip_l" | "openclip_h" | "openclip_g"
    kind: str  # "clip" | "openclip"
    single_file_prefix: str
    diffusers_subfolder: str
    hidden_act: str
    with_projection: bool
    pad_with_zero: bool  # tokenizer pads with id 0 ("!") instead of EOS
    # OpenCLIP towers carry one more block than the HF model keeps (SD2 uses the penultimate layer).
    dropped_openclip_layers: int = 0
    full: dict = field(default_factory=dict)  # hidden_size, intermediate_size, num_hidden_layers
    tiny: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ModelFamily:
    name: str  # "sd1" | "sd2" | "sdxl"
    title: str
    is_sdxl: bool
    v2: bool
    latent_scale: float
    text_encoders: tuple
    # Attention heads are not visible in weights: either a fixed count or a fixed head width.
    unet_num_heads: Optional[int]
    unet_head_dim: Optional[int]
    unet_full: dict
    unet_tiny: dict
    vae_full: dict
    vae_tiny: dict
    sample_size: int  # latent size of the native resolution
    diffusers_pipeline: str
    diffusers_scheduler: str
    modelspec_architecture: str

    def unet_heads(self, channels: int) -> int:
        if self.unet_num_heads is not None:
            return self.unet_num_heads
        return max(1, channels // self.unet_head_dim)


_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12)
_CLIP_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=12)

SD1 = ModelFamily(
    name="sd1",
    title="Stable Diffusion 1.x",
    is_sdxl=False,
    v2=False,
    latent_scale=0.18215,
    text_encoders=(
        TextEncoderSpec(
            role="clip_l", kind="clip", single_file_prefix="cond_stage_model.transformer.",
            diffusers_subfolder="text_encoder", hidden_act="quick_gelu", with_projection=False,
            pad_with_zero=False, full=_CLIP_L, tiny=_CLIP_TINY,
        ),
    ),
    unet_num_heads=8,
    unet_head_dim=None,
    unet_full=dict(block_out_channels=(320, 640, 1280, 1280), attention_levels=(True, True, True, False),
                   transformer_layers=(1, 1, 1, 1), cross_attention_dim=768),
    # tiny widths grow where the real ones do, so the same blocks get channel-changing shortcuts
    unet_tiny=dict(block_out_channels=(32, 64, 96, 96), attention_levels=(True, True, True, False),
                   transformer_layers=(1, 1, 1, 1), cross_attention_dim=32),
    vae_full=dict(block_out_channels=(128, 256, 512, 512)),
    vae_tiny=dict(block_out_channels=(32, 64, 96, 96)),
    sample_size=64,
    diffusers_pipeline="StableDiffusionPipeline",
    diffusers_scheduler="DDIMScheduler",
    modelspec_architecture="stable-diffusion-v1",
)

SD2 = ModelFamily(
    name="sd2",
    title="Stable Diffusion 2.x",
    is_sdxl=False,
    v2=True,
    latent_scale=0.18215,
    text_encoders=(
        TextEncoderSpec(
            role="openclip_h", kind="openclip", single_file_prefix="cond_stage_model.model.",
            diffusers_subfolder="text_encoder", hidden_act="gelu", with_projection=False,
            pad_with_zero=True, dropped_openclip_layers=1,
            full=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23),
            tiny=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=23),
        ),
    ),
    unet_num_heads=None,
    unet_head_dim=64,
    unet_full=dict(block_out_channels=(320, 640, 1280, 1280), attention_levels=(True, True, True, False),
                   transformer_layers=(1, 1, 1, 1), cross_attention_dim=1024, use_linear_projection=True),
    unet_tiny=dict(block_out_channels=(32, 64, 96, 96), attention_levels=(True, True, True, False),
                   transformer_layers=(1, 1, 1, 1), cross_attention_dim=32, use_linear_projection=True),
    vae_full=dict(block_out_channels=(128, 256, 512, 512)),
    vae_tiny=dict(block_out_channels=(32, 64, 96, 96)),
    sample_size=96,
    diffusers_pipeline="StableDiffusionPipeline",
    diffusers_scheduler="DDIMScheduler",
    modelspec_architecture="stable-diffusion-v2-768-v",
)

SDXL = ModelFamily(
    name="sdxl",
    title="Stable Diffusion XL base",
    is_sdxl=True,
    v2=False,
    latent_scale=0.13025,
    text_encoders=(
        TextEncoderSpec(
            role="clip_l", kind="clip", single_file_prefix="conditioner.embedders.0.transformer.",
            diffusers_subfolder="text_encoder", hidden_act="quick_gelu", with_projection=False,
            pad_with_zero=False, full=_CLIP_L, tiny=_CLIP_TINY,
        ),
        TextEncoderSpec(
            role="openclip_g", kind="openclip", single_file_prefix="conditioner.embedders.1.model.",
            diffusers_subfolder="text_encoder_2", hidden_act="gelu", with_projection=True,
            pad_with_zero=True,
            full=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32),
            tiny=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=32),
        ),
    ),
    unet_num_heads=None,
    unet_head_dim=64,
    unet_full=dict(block_out_channels=(320, 640, 1280), attention_levels=(False, True, True),
                   transformer_layers=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
                   addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=2816),
    unet_tiny=dict(block_out_channels=(32, 64, 96), attention_levels=(False, True, True),
                   transformer_layers=(1, 2, 10), cross_attention_dim=64, use_linear_projection=True,
                   addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=32 + 6 * 256),
    vae_full=dict(block_out_channels=(128, 256, 512, 512)),
    vae_tiny=dict(block_out_channels=(32, 64, 96, 96)),
    sample_size=128,
    diffusers_pipeline="StableDiffusionXLPipeline",
    diffusers_scheduler="EulerDiscreteScheduler",
    modelspec_architecture="stable-diffusion-xl-v1-base",
)

FAMILIES = {f.name: f for f in (SD1, SD2, SDXL)}


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown model family {name!r}; expected one of {', '.join(FAMILIES)}") from None
