"""The one registry of sd-scripts options that the scripts accept but refuse to run with.

sd-scripts' command lines and TOML configs carry options for features sdtrain does not have (Hub uploads,
DeepSpeed, some generator modules). They stay in the parsers, so that those files parse, and setting one
to anything but its default stops the script before any work with the one line kept here: never an
option that parses and then does nothing. Options that only modify a refused feature (the Hub's repo
type, DeepSpeed's ZeRO stage) are accepted, as sd-scripts ignores them while the feature is off; options
that ask for what sdtrain always does (`--skip_existing`) are accepted and listed with the reason. docs/refused-options.md lists them for users.
"""

from __future__ import annotations

from library.errors import UserError

_OFFLINE = "sdtrain never goes online"
_NO_DEEPSPEED = ("is not supported; train on several GPUs with `accelerate launch --multi_gpu` (DDP) and "
                 "save memory with --gradient_checkpointing, --mixed_precision bf16 or 8-bit optimizers")

# option dest → the refusal line (the option's flag leads it)
REFUSED = {
    "huggingface_repo_id": f"--huggingface_repo_id: uploading to the Hugging Face Hub is not supported ({_OFFLINE}); "
                           "upload the files in --output_dir yourself, e.g. with `huggingface-cli upload`",
    "save_state_to_huggingface": f"--save_state_to_huggingface: uploading to the Hugging Face Hub is not supported "
                                 f"({_OFFLINE}); upload the state folder yourself",
    "resume_from_huggingface": f"--resume_from_huggingface: states are not downloaded ({_OFFLINE}); download the "
                               "state folder and pass it to --resume",
    "deepspeed": f"--deepspeed {_NO_DEEPSPEED}",
    **{dest: f"--{dest}: gradients are averaged by sdtrain's own bucketed all-reduce (library/training/grad_sync.py), "
             "not by DDP, so DDP's tuning options do not apply; remove the flag"
       for dest in ("ddp_gradient_as_bucket_view", "ddp_static_graph")},
    "dataset_class": "--dataset_class: user dataset classes are written against sd-scripts' internal dataset API, "
                     "which sdtrain does not have; describe the data with --dataset_config (TOML) or metadata JSON",
    "force_download": f"--force_download: models are not downloaded ({_OFFLINE}); download the tagger's files "
                      "yourself and put them in the model folder (docs/labelling.md says which and where)",
    # generators: sd-scripts modules and features this generator does not implement
    **{dest: f"--{dest}: {feature} is not supported by this generator; remove the flag"
       for dest, feature in {
           "from_module": "prompter modules",
           "control_net_models": "ControlNet",
           "clip_vision_strength": "CLIP Vision conditioning",
           "highres_fix_upscaler": "upscaler modules",
           "ds_depth_1": "Deep Shrink",
           "gradual_latent_timesteps": "Gradual Latent",
           "network_regional_mask_max_color_codes": "regional LoRA masks",
           "pyramid_noise_prob": "pyramid noise",
           "noise_offset_prob": "noise offset",
       }.items()},
}

# Options that only modify a refused feature: sd-scripts ignores them while the feature is off, and
# GUI-made configs carry them always, so they are accepted (the feature itself is refused above).
# option dest → the refused option it modifies
MODIFIES_REFUSED = {
    **{dest: "huggingface_repo_id" for dest in ("huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token",
                                                "huggingface_repo_visibility", "async_upload")},
    **{dest: "deepspeed" for dest in ("zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path",
                                      "offload_param_device", "offload_param_nvme_path", "zero3_init_flag",
                                      "zero3_save_16bit_model", "fp16_master_weights_and_gradients")},
    "prompter_module_args": "from_module",
    "highres_fix_upscaler_args": "highres_fix_upscaler",
    **{dest: "control_net_models" for dest in ("control_net_preps", "control_net_weights")},
    **{dest: "ds_depth_1" for dest in ("ds_timesteps_1", "ds_depth_2", "ds_timesteps_2", "ds_ratio")},
    **{dest: "gradual_latent_timesteps" for dest in ("gradual_latent_ratio", "gradual_latent_ratio_step",
                                                     "gradual_latent_every_n_steps", "gradual_latent_s_noise",
                                                     "gradual_latent_unsharp_params")},
    "pyramid_noise_discount_range": "pyramid_noise_prob",
    "noise_offset_range": "noise_offset_prob",
}

# Options that ask for what the script always does here: accepted, and they change nothing because the
# behaviour they ask for is the only one. option dest → why
ALWAYS_SO = {
    "skip_existing": "intact cache entries are always skipped (sd-scripts: a deprecated no-op)",
    "no_preview": "the generator never opens a preview window",
    "highvram": "no device-cache clearing between batches is done, which is what --highvram asks",
    "console_log_simple": "console lines are always plain text (no rich formatting)",
    "lowram": "models are memory-mapped and each part read once in its final dtype, the lean loading --lowram asks "
              "for (recorded as ss_lowram)",
}


def refuse_set_options(args, parser=None) -> None:
    """One UserError for the first registered option that `args` sets: to anything but its default in
    `parser` (without a parser: anything but None, False, "" or [])."""
    for dest, line in REFUSED.items():
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        default = parser.get_default(dest) if parser is not None else None
        if value != default and value not in (None, False, [], ""):
            raise UserError(line)


def is_registered(dest: str) -> bool:
    """Whether the registry accounts for `dest`: refused, a modifier of a refused feature, or always so."""
    return dest in REFUSED or dest in MODIFIES_REFUSED or dest in ALWAYS_SO
