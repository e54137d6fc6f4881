"""Loading for gen_img's command line: precision, model, textual inversion, networks → a GenerationEngine.

`build_engine` reads the flags (`--ckpt`, `--vae`, `--fp16`/`--bf16`, `--textual_inversion_embeddings`,
`--network_module`/`--network_weights`/..., attention and VAE options), loads and places everything on
the device and returns the engine of library/generation/engine.py. Textual-inversion files add their tokens
(`stem`, `stem1`...) to the tokenizers and their vectors to the text encoders; networks are applied, or
merged into the weights with `--network_merge` / `--network_merge_n_models`.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from typing import Callable, List, Optional, Sequence

import torch

from library.errors import UserError
from library.generation.engine import GenerationEngine
from library.models.checkpoint_io import check_finite
from library.models.text_encoder_view import plugin_text_encoders

logger = logging.getLogger(__name__)


def resolve_dtype(args, device: torch.device) -> torch.dtype:
    """--fp16 needs CUDA (one warning, float32 on CPU); --bf16 works where the device has bf16 kernels."""
    if args.fp16 or args.full_fp16:
        if device.type != "cuda":
            logger.warning("--fp16 needs CUDA; generating in float32 on %s instead", device.type)
            return torch.float32
        return torch.float16
    if args.bf16 or args.full_bf16:
        from library.models.device_setup import bf16_or_float32

        return bf16_or_float32(device, "--bf16", "generating")
    return torch.float32


def embedding_vectors(path: str, family, text_encoders) -> List[torch.Tensor]:
    """The vectors of an embedding file, one (N, width) tensor per text encoder; checked against the model."""
    from library.models.embedding_files import load_embedding

    widths = [encoder.get_input_embeddings().weight.shape[1] for encoder in text_encoders]
    return load_embedding(path, family.is_sdxl, widths, require_all=True)


def load_textual_inversion(paths: Sequence[str], family, tokenizers, text_encoders) -> Callable[[str], str]:
    """Add each file's tokens (`stem`, `stem1`...) and vectors; returns the prompt expander.

    A multi-vector embedding is used by writing its first token: the expander turns `stem` into
    `stem stem1 stem2...`, matching tokens longest-first as the tokenizer does.
    """
    added: List[tuple] = []  # (token strings, vectors per encoder)
    for path in paths:
        vectors = embedding_vectors(path, family, text_encoders)
        stem = os.path.splitext(os.path.basename(path))[0]
        strings = [stem] + [f"{stem}{i}" for i in range(1, vectors[0].shape[0])]
        for tokenizer in tokenizers:
            if tokenizer.add_tokens(strings) != len(strings):
                raise UserError(f"{path}: the token {stem!r} (the file name) is already in the tokenizer; rename the file")
        added.append((strings, vectors))
        logger.info("textual inversion: %s → %d vector(s)", stem, len(strings))
    for tokenizer, encoder, index in zip(tokenizers, text_encoders, range(len(text_encoders))):
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            for strings, vectors in added:
                ids = tokenizer.convert_tokens_to_ids(strings)
                weight[ids] = vectors[index].to(weight.device, weight.dtype)
    return _token_expander(added)


def _token_expander(added) -> Callable[[str], str]:
    expansions = {strings[0].lower(): " ".join(strings) for strings, _ in added if len(strings) > 1}
    if not expansions:
        return lambda text: text
    every = sorted({s for strings, _ in added for s in strings}, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(s) for s in every), re.IGNORECASE)
    return lambda text: pattern.sub(lambda m: expansions.get(m.group(0).lower(), m.group(0)), text)


def _network_kwargs(text: Optional[str]) -> dict:
    kwargs = {}
    for item in (text or "").split(";"):
        if item.strip():
            key, sep, value = item.partition("=")
            if not sep:
                raise UserError(f"--network_args {text!r}: expected key=value items separated by ';'")
            kwargs[key.strip()] = value.strip()
    return kwargs


def load_networks(args, models, dtype: torch.dtype, device: torch.device):
    """Create, load and apply (or merge) every --network_module; returns (applied networks, multipliers)."""
    modules = args.network_module or []
    merge_count = len(modules) if args.network_merge else (args.network_merge_n_models or 0)
    networks, muls = [], []
    for i, (name, path) in enumerate(zip(modules, args.network_weights or [])):
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise UserError(f"--network_module {name}: cannot import it ({e})") from None
        if not os.path.isfile(path):
            raise UserError(f"{path}: network weights file not found")
        mul = args.network_mul[i] if args.network_mul and i < len(args.network_mul) else 1.0
        kwargs = _network_kwargs(args.network_args[i] if args.network_args and i < len(args.network_args) else None)
        if args.network_show_meta and path.endswith(".safetensors"):
            from library.models.safetensors_io import read_metadata

            logger.info("metadata of %s: %s", path, read_metadata(path))
        encoders = plugin_text_encoders(name, models.text_encoders)  # as the trainer hands them to plugins
        try:
            network, weights = module.create_network_from_weights(mul, path, models.vae, encoders, models.unet,
                                                                  for_inference=True, **kwargs)
        except UserError as e:  # name the file: the plugin's message may not
            raise UserError(str(e) if path in str(e) else f"{path}: {e}") from None
        check_finite(weights, path)
        _check_network_fits(network, weights, path, models.family)
        try:
            if i < merge_count and network.is_mergeable():
                merge_network(network, weights, models, mul, dtype, device, path)
                logger.info("merged %s (multiplier %s)", path, mul)
                continue
            # both parts explicitly: plugins such as lycoris.kohya require the flags
            network.apply_to(encoders, models.unet, True, True)
            network.load_state_dict(weights, strict=False)
        except RuntimeError as e:  # tensor shapes of another model size
            raise UserError(f"{path}: does not fit this {models.family.title} model ({str(e).strip().splitlines()[0]})") from None
        network.to(device, dtype).eval()
        if args.network_pre_calc:
            if not all(hasattr(network, m) for m in ("backup_weights", "restore_weights", "pre_calculation")):
                raise UserError(f"--network_pre_calc: {name} networks cannot pre-calculate their weights; leave the "
                                "flag out (they are applied as they are) or merge them with --network_merge")
            network.backup_weights()
        networks.append(network)
        muls.append(mul)
    return networks, muls


def merge_network(network, weights: dict, models, multiplier: float, dtype, device, path: str) -> None:
    """--network_merge: LoRA and LyCORIS files through `library.models.network_merge` (one formula for
    every tool; lycoris-lora's own merge_to scales LoKr and LoHa changes twice), others through the plugin."""
    from library.models import network_merge
    from library.models.network_deltas import group_modules

    if network_merge.understands(group_modules(weights)):
        network_merge.merge_into_models(weights, models.text_encoders, models.unet, multiplier, path, models.family.title)
    else:
        network.merge_to(list(models.text_encoders), models.unet, weights, dtype, device)


def _check_network_fits(network, weights: dict, path: str, family) -> None:
    """Every module of the file must have found its layer: none → another family (refused); some → a warning
    naming how many and which part (a part dropped without a word would be a silent wrong image)."""
    in_file = {k.partition(".")[0] for k in weights if "." in k and k.startswith(("lora_te", "lora_unet"))}
    unmatched = getattr(network, "unmatched_modules", None)
    if unmatched is None:  # a plugin: compare with the modules it built
        built = getattr(network, "text_encoder_loras", []) + getattr(network, "unet_loras", [])
        unmatched = sorted(in_file - {getattr(m, "lora_name", None) for m in built})
    if in_file and len(unmatched) == len(in_file):
        raise UserError(f"{path}: none of its {len(in_file)} modules match this {family.title} model "
                        "(made for another model family?)")
    if unmatched:
        encoder = sum(1 for m in unmatched if m.startswith("lora_te"))
        logger.warning("%s: %d of its %d modules match no layer of this model and are not applied (%d of the text "
                       "encoder, %d of the U-Net), e.g. %s", path, len(unmatched), len(in_file), encoder,
                       len(unmatched) - encoder, unmatched[0])


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    # diffusers warns on every .to(dtype) call, so cast only when the dtype really changes
    module.to(device).eval()
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)


def build_engine(args, sdxl: Optional[bool] = None) -> GenerationEngine:
    """Load the model, tokenizers, embeddings and networks named by the command line."""
    from types import SimpleNamespace

    from library.models.device_setup import set_attention
    from library.models.loading import load_models
    from library.text.tokenizer import load_tokenizers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args, device)
    models = load_models(args.ckpt, v2=True if getattr(args, "v2", False) else None,
                         v_parameterization=True if args.v_parameterization else None,
                         sdxl=True if getattr(args, "sdxl", False) else sdxl, dtype=dtype, vae=args.vae)
    family = models.family
    if getattr(args, "v1", False) and family.name != "sd1":
        raise UserError(f"{args.ckpt}: --v1 was given but the file is a {family.title} model; remove --v1")
    tokenizers = load_tokenizers(family, args.ckpt, args.tokenizer_cache_dir)
    expander = None
    if args.textual_inversion_embeddings:
        expander = load_textual_inversion(args.textual_inversion_embeddings, family, tokenizers, models.text_encoders)
    vae_dtype = torch.float32 if args.no_half_vae or (dtype == torch.float16 and family.is_sdxl) else dtype
    for module, wanted in [(models.unet, dtype), (models.vae, vae_dtype)] + [(te, dtype) for te in models.text_encoders]:
        _place(module, device, wanted)
    set_attention(models.unet, SimpleNamespace(xformers=args.xformers or args.diffusers_xformers), device)
    if args.opt_channels_last:
        models.unet.to(memory_format=torch.channels_last)
    if args.vae_slices:
        models.vae.enable_tiling()
    networks, muls = load_networks(args, models, dtype, device)
    from library.generation.control import load_control_nets

    control_nets = load_control_nets(args, models, dtype, device)
    return GenerationEngine(
        models, tokenizers, device, clip_skip=args.clip_skip, max_embeddings_multiples=args.max_embeddings_multiples or 1,
        emb_normalize_mode=args.emb_normalize_mode, zero_terminal_snr=args.zero_terminal_snr,
        zero_steps_offset=args.force_scheduler_zero_steps_offset, vae_batch_size=args.vae_batch_size,
        networks=networks, network_default_muls=muls, network_pre_calc=args.network_pre_calc,
        prompt_expander=expander, show_progress=True, control_nets=control_nets,
    )
