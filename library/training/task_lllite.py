"""The ControlNet-LLLite task (`sdxl_train_control_net_lllite.py`): train a control network on a frozen SDXL.

The network (`networks/control_net_lllite.py`, loaded by module name like every network) attaches
to the U-Net's attention projections; only its parameters train, at `--learning_rate`. The dataset
is ControlNet subsets (`conditioning_data_dir`): each image's hint image is resized, cropped and
flipped with it, brought to [-1, 1] and (with a latent cache) cached with its latents
(`library.data.train_dataset`, `library.caching.latent_cache`). Before every U-Net call the batch's
hint images are embedded (`before_unet`), so training and validation see them alike; the loss is
the shared one, without masks (spec textual-inversion-and-lllite.md §2.4).

Saved files are sd-scripts' (`lllite_unet_*` keys) with modelspec metadata only, architecture
`stable-diffusion-xl-v1-base/control-net-lllite`. Sample images during training take each prompt's
`--cn <hint image>` (library/generation/sampling.py).
"""

from __future__ import annotations

import importlib
import logging
from typing import Dict, Optional

import torch

from library.errors import UserError
from library.training.run import Run, Task

logger = logging.getLogger(__name__)

NETWORK_MODULE = "networks.control_net_lllite"
HINT_SIDE_MULTIPLE = 32  # the deepest conditioning embedding shrinks the hint 32 times


class LLLiteTask(Task):
    name = "controlnet-lllite"
    sdxl = True
    conditioning_images_are_masks = False  # they are the hints the network learns to follow
    # ControlNet subsets only (every subset needs conditioning_data_dir), as sd-scripts' LLLite trainer
    dataset_support = {"support_dreambooth": False, "support_finetuning": False, "support_controlnet": True}

    def __init__(self):
        self._save_as = "safetensors"
        self.network = None
        self.module = None
        self._dataset_scaled = False
        self._weights = None  # --network_weights, read while checking the data

    @property
    def artifact_ext(self) -> str:  # noqa: D401 - property replaces the class attribute
        return "." + (self._save_as or "safetensors")

    # --- arguments and data, before any model loads -------------------------------------------

    def validate_args(self, args) -> None:
        self._save_as = args.save_model_as or "safetensors"
        if args.random_crop:
            raise UserError("--random_crop: not supported by ControlNet-LLLite training (the hint image must stay "
                            "aligned with its image); remove the flag")
        if args.alpha_mask:
            raise UserError("--alpha_mask: ControlNet-LLLite trains without a loss mask; remove the flag")
        if args.dataset_check:
            return  # only the data is looked at
        if not args.output_dir:
            raise UserError("--output_dir is required")
        if args.network_weights is None:
            for flag in ("cond_emb_dim", "network_dim"):
                if getattr(args, flag) is None:
                    raise UserError(f"--{flag} is required (sd-scripts' docs use --cond_emb_dim 32 "
                                    "--network_dim 64 for canny), or pass --network_weights to continue a file")
        for flag in ("cond_emb_dim", "network_dim"):
            value = getattr(args, flag)
            if value is not None and (value < 1 or (flag == "cond_emb_dim" and value % 2)):
                raise UserError(f"--{flag} {value}: must be a positive{' even' if flag == 'cond_emb_dim' else ''} "
                                "whole number")
        if args.network_dropout is not None and not 0.0 <= args.network_dropout < 1.0:
            raise UserError(f"--network_dropout {args.network_dropout}: must be in [0, 1)")

    def check_data(self, scan, args) -> None:
        from library.training.trainer import peek_family

        family = peek_family(args, True)  # SDXL when the file cannot be read cheaply; loading then says why
        if not family.is_sdxl:
            raise UserError(f"{args.pretrained_model_name_or_path}: is a {family.title} model; ControlNet-LLLite "
                            "works with SDXL models only")
        self.module = importlib.import_module(NETWORK_MODULE)
        if args.network_weights:  # a file that does not fit is reported now, not after the model loads
            self._weights = self.module.read_lllite_file(args.network_weights)
            file_dims = self.module.dims_from_weights(self._weights, args.network_weights)
            given = (args.cond_emb_dim or file_dims[0], args.network_dim or file_dims[1])
            if given != file_dims:
                raise UserError(f"--network_weights {args.network_weights}: made with --cond_emb_dim {file_dims[0]} "
                                f"--network_dim {file_dims[1]}, not {given[0]} / {given[1]}; give the file's values "
                                "or leave both out")
            args.cond_emb_dim, args.network_dim = file_dims
        for dataset in scan.datasets:
            if dataset.params.enable_bucket or dataset.params.resolution is None:
                continue  # SDXL buckets are multiples of 32 already
            w, h = dataset.params.resolution
            if w % HINT_SIDE_MULTIPLE or h % HINT_SIDE_MULTIPLE:
                raise UserError(f"resolution {w}x{h} (dataset #{dataset.index + 1}): ControlNet-LLLite needs sides "
                                f"that are multiples of {HINT_SIDE_MULTIPLE}, e.g. --resolution 1024")

    # --- set-up --------------------------------------------------------------------------------

    def setup(self, run: Run) -> None:
        args = run.args
        self.network = self.module.ControlNetLLLite(run.models.unet, args.cond_emb_dim, args.network_dim,
                                                    dropout=args.network_dropout)
        if self._weights is not None:
            self.network.load_lllite_state_dict(self._weights, args.network_weights)
            self._weights = None
            logger.info("ControlNet-LLLite: weights loaded from %s", args.network_weights)
        self.network.apply_to()
        self.network.to(run.device, dtype=run.precision.train_dtype)
        self.network.prepare_grad_etc()
        self.network.train()

    def param_groups(self, run: Run) -> tuple:
        return [{"params": self.network.get_trainable_params(), "lr": run.args.learning_rate}], ["lllite"]

    # --- the loop's hooks ----------------------------------------------------------------------

    def before_unet(self, run: Run, batch: dict) -> None:
        hints = batch.get("conditioning_images")
        if hints is None:
            raise UserError("a batch came without conditioning images; ControlNet-LLLite needs a hint image for "
                            "every training image (conditioning_data_dir)")
        multipliers = batch.get("network_multipliers")  # the dataset's network_multiplier
        scale = float(multipliers.mean()) if multipliers is not None else 1.0
        if scale != 1.0 or self._dataset_scaled:  # leaves a multiplier set from outside alone otherwise
            self.network.set_multiplier(scale)
            self._dataset_scaled = scale != 1.0
        with run.precision_autocast():
            self.network.set_cond_image(hints.to(run.device))

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        return dict(self.network.state_dict())

    def load_trainable_state(self, tensors: Dict[str, torch.Tensor]) -> None:
        self.network.load_lllite_state_dict(tensors, "--resume state")

    def sampling_networks(self) -> list:
        return [self.network]

    def sampling_control_nets(self) -> list:
        return [self.network]

    def save(self, run: Run, path: str, epoch: int, step: int, final: bool) -> None:
        from library.models.saving import PRECISIONS

        for name, tensor in self.network.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise UserError(f"step {step}: ControlNet-LLLite weight {name} is not finite; nothing was saved. "
                                "Lower --learning_rate")
        args = run.args
        dtype = PRECISIONS.get(args.save_precision) if args.save_precision else None
        self.network.save_weights(path, dtype, self._metadata(run) if path.endswith(".safetensors") else None)

    def _metadata(self, run: Run) -> Dict[str, str]:
        """modelspec keys only, as sd-scripts' LLLite trainer writes (no ss_* training keys)."""
        from library.models import modelspec

        args = run.args
        datasets = run.dataset.scan.datasets
        resolution: Optional[tuple] = None
        if datasets and datasets[0].params.resolution:
            resolution = tuple(datasets[0].params.resolution)
        extra = {name: getattr(args, f"metadata_{name}", None) for name in (
            "author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from", "trigger_phrase",
            "preprocessor", "is_negative_embedding")}
        timesteps = (args.min_timestep, args.max_timestep)
        return modelspec.build_metadata(
            run.family, run.models.v_parameterization, args.metadata_title or args.output_name or "lllite",
            kind=self.module.ARCHITECTURE_KIND, resolution=resolution,
            timestep_range=timesteps if any(t is not None for t in timesteps) else None, extra=extra,
        )
