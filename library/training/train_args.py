"""Command-line flags of the trainers (sd-scripts' names, defaults and meanings) and `--config_file`.

Only argparse and the standard library are imported here, so `--help` answers at once. Groups
owned by other modules (dataset, optimizer, noise/loss) are added through their own
`add_*_arguments` functions.

`parse_args` reads the command line, then `--config_file` (`library/training/config_file.py`: sd-scripts'
flat TOML with types kept; CLI > TOML > defaults; keys naming no option warned about in one line).
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, Iterable, List, Optional

from library.cli import apply_console_log_flags
from library.errors import UserError
from library.refused_options import refuse_set_options
from library.training import config_file
from library.training.optimizers import check_learning_rates

SAVE_PRECISIONS = [None, "float", "fp16", "bf16"]


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("console logging")
    g.add_argument("--console_log_level", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], default=None,
                   help="console log level (default INFO)")
    g.add_argument("--console_log_file", type=str, default=None,
                   help="write the log lines to this file (overwritten) instead of the console")
    g.add_argument("--console_log_simple", action="store_true", help="plain log lines (always so here)")


def add_model_arguments(parser: argparse.ArgumentParser, sdxl: bool = False) -> None:
    g = parser.add_argument_group("model")
    if sdxl:
        # sd-scripts' SDXL scripts have --v2 and refuse it when set (train_args.refuse_sdxl_v2)
        action = g.add_argument("--v2", action="store_true",
                                help="not for SDXL: accepted so shared configs parse, refused when set")
        action.sdxl = True
    else:
        g.add_argument("--v2", action="store_true",
                       help="the model is SD2.x (detected from the weights anyway; a contradiction is an error)")
    g.add_argument("--v_parameterization", action="store_true",
                   help="v-prediction model (SD2.x 768-v); also read from a diffusers scheduler config or file metadata")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="base model: single-file .safetensors/.ckpt or a diffusers folder (never downloaded)")
    g.add_argument("--tokenizer_cache_dir", type=str, default=None,
                   help="folder to read tokenizers from, or save the offline-built ones to")
    g.add_argument("--vae", type=str, default=None, help="replace the model's VAE: a file or diffusers folder")
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 under mixed precision")


def add_modelspec_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("modelspec metadata (stored as modelspec.<name>)")
    for name, what in [("title", "title (default: output_name)"), ("author", "author"), ("description", "description"),
                       ("license", "license"), ("tags", "comma-separated tags"), ("usage_hint", "usage hint"),
                       ("thumbnail", "thumbnail image path or data URL"), ("merged_from", "source models"),
                       ("trigger_phrase", "trigger phrase"), ("preprocessor", "preprocessor"),
                       ("is_negative_embedding", "mark a negative embedding")]:
        g.add_argument(f"--metadata_{name}", type=str, default=None, help=f"modelspec {what}")


def modelspec_flags(args: argparse.Namespace) -> Dict[str, Optional[str]]:
    """The --metadata_* values (but the title) as `modelspec.build_metadata`'s `extra`."""
    return {
        "author": args.metadata_author, "description": args.metadata_description, "license": args.metadata_license,
        "tags": args.metadata_tags, "usage_hint": args.metadata_usage_hint, "thumbnail": args.metadata_thumbnail,
        "merged_from": args.metadata_merged_from, "trigger_phrase": args.metadata_trigger_phrase,
        "preprocessor": args.metadata_preprocessor, "is_negative_embedding": args.metadata_is_negative_embedding,
    }


_UNSUPPORTED = "sd-scripts flag, accepted in configs; refused when set (see docs/refused-options.md)"


def add_training_arguments(parser: argparse.ArgumentParser, support_dreambooth: bool = True) -> None:
    g = parser.add_argument_group("output and saving")
    g.add_argument("--output_dir", type=str, default=None, help="folder for the trained files")
    g.add_argument("--output_name", type=str, default=None, help="base name of the trained files (default: last)")
    g.add_argument("--save_precision", choices=SAVE_PRECISIONS, default=None, help="precision of saved weights")
    g.add_argument("--save_every_n_epochs", type=int, default=None, help="save every N epochs")
    g.add_argument("--save_every_n_steps", type=int, default=None, help="save every N steps")
    g.add_argument("--save_n_epoch_ratio", type=int, default=None, help="save about N times over the run")
    g.add_argument("--save_last_n_epochs", type=int, default=None, help="keep only the last N epoch saves")
    g.add_argument("--save_last_n_epochs_state", type=int, default=None, help="keep only the last N epoch states")
    g.add_argument("--save_last_n_steps", type=int, default=None, help="keep only saves of the last N steps")
    g.add_argument("--save_last_n_steps_state", type=int, default=None, help="keep only states of the last N steps")
    g.add_argument("--save_state", action="store_true", help="also save the training state (for --resume) at each save")
    g.add_argument("--save_state_on_train_end", action="store_true", help="save the training state at the end")
    g.add_argument("--resume", type=str, default=None, help="resume from a saved state folder")

    # sd-scripts' Hub upload and DeepSpeed flags: accepted so existing configs parse; turning one on
    # is refused in parse_args with a line saying what to do instead
    g = parser.add_argument_group("Hugging Face Hub and DeepSpeed (not supported: sdtrain works offline, with DDP)")
    for flag in ("--huggingface_repo_id", "--huggingface_repo_type", "--huggingface_path_in_repo",
                 "--huggingface_token", "--huggingface_repo_visibility"):
        g.add_argument(flag, type=str, default=None, help=_UNSUPPORTED)
    g.add_argument("--save_state_to_huggingface", action="store_true", help=_UNSUPPORTED)
    g.add_argument("--resume_from_huggingface", action="store_true", help=_UNSUPPORTED)
    g.add_argument("--async_upload", action="store_true", help=_UNSUPPORTED)
    g.add_argument("--deepspeed", action="store_true", help=_UNSUPPORTED)
    g.add_argument("--zero_stage", type=int, default=2, choices=[0, 1, 2, 3], help=_UNSUPPORTED)
    for flag in ("--offload_optimizer_device", "--offload_optimizer_nvme_path", "--offload_param_device",
                 "--offload_param_nvme_path"):
        g.add_argument(flag, type=str, default=None, help=_UNSUPPORTED)
    for flag in ("--zero3_init_flag", "--zero3_save_16bit_model", "--fp16_master_weights_and_gradients"):
        g.add_argument(flag, action="store_true", help=_UNSUPPORTED)

    g = parser.add_argument_group("training")
    g.add_argument("--train_batch_size", type=int, default=1, help="batch size per device")
    g.add_argument("--max_token_length", type=int, default=None, choices=[None, 75, 150, 225],
                   help="caption length in tokens: 75 (default), 150 or 225")
    g.add_argument("--mem_eff_attn", action="store_true", help="memory-efficient attention (falls back to SDPA)")
    g.add_argument("--xformers", action="store_true", help="xformers attention (CUDA; falls back to SDPA with a warning)")
    g.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)")
    g.add_argument("--torch_compile", action="store_true", help="compile the U-Net with torch.compile")
    g.add_argument("--dynamo_backend", type=str, default="inductor", help="torch.compile backend")
    g.add_argument("--max_train_steps", type=int, default=1600, help="number of optimizer steps")
    g.add_argument("--max_train_epochs", type=int, default=None, help="number of epochs (overrides --max_train_steps)")
    g.add_argument("--max_data_loader_n_workers", type=int, default=8, help="image-loading worker processes")
    g.add_argument("--persistent_data_loader_workers", action="store_true",
                   help="keep the image-loading workers alive between epochs instead of starting them every epoch")
    g.add_argument("--seed", type=int, default=None, help="random seed (random when not given; recorded in metadata)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for memory")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no", help="mixed precision")
    g.add_argument("--full_fp16", action="store_true", help="train with fp16 weights and gradients")
    g.add_argument("--full_bf16", action="store_true", help="train with bf16 weights and gradients")
    g.add_argument("--fp8_base", action="store_true",
                   help="hold the frozen U-Net's and text encoders' Linear/Conv2d weights in float8_e4m3fn (scaled "
                        "per tensor), upcast per layer to the compute dtype: half the memory of fp16/bf16 weights; "
                        "CUDA and CPU; network training and textual inversion (not full fine-tuning)")
    g.add_argument("--ddp_timeout", type=int, default=None, help="distributed timeout in minutes")
    g.add_argument("--ddp_gradient_as_bucket_view", action="store_true",
                   help="DDP option; refused (gradients are averaged without DDP, docs/refused-options.md)")
    g.add_argument("--ddp_static_graph", action="store_true",
                   help="DDP option; refused (gradients are averaged without DDP, docs/refused-options.md)")
    g.add_argument("--clip_skip", type=int, default=None, help="use the output of the k-th last text-encoder layer")
    g.add_argument("--lowram", action="store_true", help="lean model loading (always so here: models are memory-mapped)")
    g.add_argument("--highvram", action="store_true", help="no device-cache clearing between batches (always so here)")
    g.add_argument("--initial_epoch", type=int, default=None,
                   help="start at this epoch (1-based): step counts, file names and schedules continue from there")
    g.add_argument("--initial_step", type=int, default=None,
                   help="start at this step (overrides the step of a --resume state)")
    g.add_argument("--skip_until_initial_step", action="store_true",
                   help="start the data at --initial_step / --initial_epoch too (else at the start of that epoch)")

    g = parser.add_argument_group("validation (images held out by --validation_split)")
    g.add_argument("--validate_every_n_steps", type=int, default=None, help="validate every N steps")
    g.add_argument("--validate_every_n_epochs", type=int, default=None,
                   help="validate at the end of every N epochs (default: every epoch when there is a validation split)")
    g.add_argument("--max_validation_steps", type=int, default=None, help="validate on at most N batches per pass")

    g = parser.add_argument_group("logging and samples")
    g.add_argument("--logging_dir", type=str, default=None, help="log folder (a timestamped sub-folder per run)")
    g.add_argument("--log_with", choices=["tensorboard", "wandb", "all"], default=None, help="logger")
    g.add_argument("--log_prefix", type=str, default=None, help="prefix of the run's log folder")
    g.add_argument("--log_tracker_name", type=str, default=None, help="tracker (project) name")
    g.add_argument("--wandb_run_name", type=str, default=None, help="wandb run name")
    g.add_argument("--log_tracker_config", type=str, default=None, help="TOML file of tracker init arguments")
    g.add_argument("--wandb_api_key", type=str, default=None, help="wandb API key")
    g.add_argument("--log_config", action="store_true", help="log the run's arguments to the tracker")
    g.add_argument("--sample_every_n_steps", type=int, default=None, help="generate samples every N steps")
    g.add_argument("--sample_every_n_epochs", type=int, default=None, help="generate samples every N epochs")
    g.add_argument("--sample_at_first", action="store_true", help="generate samples before training")
    g.add_argument("--sample_prompts", type=str, default=None, help="prompts file (.txt, .toml or .json)")
    g.add_argument("--sample_sampler", type=str, default="ddim", help="sampler for samples (ddim, euler_a, ...)")

    g = parser.add_argument_group("config file")
    g.add_argument("--config_file", type=str, default=None, help="TOML file of arguments (CLI values take precedence)")
    g.add_argument("--output_config", action="store_true", help="write the arguments to --config_file and exit")
    g.add_argument("--config_strict", action="store_true",
                   help="make keys of --config_file that name no option of this script an error (default: one warning)")
    if support_dreambooth:
        parser.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularization images")


def add_masked_loss_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("masked loss")
    g.add_argument("--conditioning_data_dir", type=str, default=None, help="folder of mask images (R channel)")
    g.add_argument("--masked_loss", action="store_true", help="weight the loss by masks (or alpha with --alpha_mask)")


def add_sdxl_arguments(parser: argparse.ArgumentParser) -> None:
    """SDXL-only flags; the text-encoder caching flags come with the cache group."""
    g = parser.add_argument_group("SDXL")
    g.add_argument("--disable_mmap_load_safetensors", action="store_true",
                   help="read model files into memory instead of memory-mapping them (faster on some file systems)")


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("network")
    g.add_argument("--no_metadata", action="store_true", help="write only the minimum ss_* metadata")
    g.add_argument("--save_model_as", choices=[None, "ckpt", "pt", "safetensors"], default="safetensors",
                   help="file format of the trained network")
    g.add_argument("--unet_lr", type=float, default=None, help="U-Net learning rate (default --learning_rate)")
    g.add_argument("--text_encoder_lr", type=float, nargs="*", default=None,
                   help="text-encoder learning rate(s) (default --learning_rate)")
    g.add_argument("--fp8_base_unet", action="store_true",
                   help="as --fp8_base, for the U-Net only: the text encoders keep their usual dtype")
    g.add_argument("--network_weights", type=str, default=None, help="start from these network weights")
    g.add_argument("--network_module", type=str, default="networks.lora",
                   help="network module: networks.lora, networks.dylora, networks.lora_fa, lycoris.kohya, ...")
    g.add_argument("--network_dim", type=int, default=None, help="network rank (module default when unset)")
    g.add_argument("--network_alpha", type=float, default=1.0, help="alpha: the weight scale is alpha / dim")
    g.add_argument("--network_dropout", type=float, default=None, help="dropout of the network's hidden activations")
    g.add_argument("--network_args", type=str, nargs="*", default=None, help="module options as key=value")
    g.add_argument("--network_train_unet_only", action="store_true", help="train only the U-Net part")
    g.add_argument("--network_train_text_encoder_only", action="store_true", help="train only the text-encoder part")
    g.add_argument("--training_comment", type=str, default=None, help="free text stored in the metadata")
    g.add_argument("--dim_from_weights", action="store_true", help="take dims and alphas from --network_weights")
    g.add_argument("--scale_weight_norms", type=float, default=None, help="max norm of each module's weight update")
    g.add_argument("--base_weights", type=str, nargs="*", default=None, help="networks merged into the model first")
    g.add_argument("--base_weights_multiplier", type=float, nargs="*", default=None, help="their multipliers (default 1)")
    g.add_argument("--network_multiplier", type=float, default=1.0, help="multiplier of the trained network")


def fp8_flag(args) -> Optional[str]:
    """The fp8 flag a run sets ("--fp8_base_unet" wins: U-Net only), or None; read by the trainer,
    which holds those frozen weights in fp8 (library/models/fp8_weights.py)."""
    if getattr(args, "fp8_base_unet", False):
        return "--fp8_base_unet"
    return "--fp8_base" if getattr(args, "fp8_base", False) else None


def parse_network_args(items) -> Dict[str, str]:
    kwargs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--network_args {item!r}: expected key=value")
        kwargs[key.strip()] = value.strip()
    return kwargs


# ---------------------------------------------------------------------------------------------
# parsing: the command line, then --config_file (library/training/config_file.py)


def parse_args(parser: argparse.ArgumentParser, argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the CLI, then fill values from --config_file where the CLI did not set them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.output_config:
        print(f"wrote {config_file.write_config(parser, args)}")
        sys.exit(0)
    if args.config_file:
        path = config_file.config_path(args.config_file)
        from_file, unknown = config_file.read_config_file(path, parser)
        explicit = _explicit_dests(parser, argv)
        for key, value in from_file.items():
            if key not in explicit:  # CLI > TOML
                setattr(args, key, parser.get_default(key) if value is config_file.NOT_SET else value)
        apply_console_log_flags(args)  # the lines below go where the user asked
        config_file.report_unknown_keys(path, unknown, parser, bool(getattr(args, "config_strict", False)),
                                        getattr(parser, "option_scripts", None))
    refuse_set_options(args, parser)
    refuse_sdxl_v2(args, parser)
    check_learning_rates(args)
    if not args.config_file:
        apply_console_log_flags(args)
    _check_log_tracker_config(args)
    if getattr(args, "cache_latents_on_first_use", False) and not args.cache_latents_to_disk:
        args.cache_latents = True  # it only changes when the cache is filled
    return args


def _check_log_tracker_config(args: argparse.Namespace) -> None:
    """Read --log_tracker_config now, so a bad file stops the run before any model loads."""
    if getattr(args, "log_tracker_config", None):
        from library.training.train_logging import tracker_init_kwargs

        tracker_init_kwargs(args.log_tracker_config)


def refuse_sdxl_v2(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """`--v2` on an SDXL script: accepted so shared configs parse (`v2 = false`), refused when set, as sd-scripts."""
    action = parser._option_string_actions.get("--v2")
    if getattr(action, "sdxl", False) and getattr(args, "v2", False):
        raise UserError("--v2: SDXL is not SD 2.x; v2 cannot be enabled for SDXL scripts (as in sd-scripts); "
                        "remove --v2 (or v2 = true from the config file)")


def _explicit_dests(parser: argparse.ArgumentParser, argv: Iterable[str]) -> set:
    """Destinations the user set on the command line (option strings, prefix-free as argparse requires)."""
    by_option = {}
    for action in parser._actions:
        for opt in action.option_strings:
            by_option[opt] = action.dest
    dests = set()
    for token in argv:
        if token.startswith("--"):
            opt = token.split("=", 1)[0]
            if opt in by_option:
                dests.add(by_option[opt])
    return dests
