"""The network task: train an adapter (LoRA and its family, or any `--network_module` plugin).

Talks to the network module only through the sd-scripts plugin interface
(`create_network`, `create_network_from_weights`, `apply_to`, `prepare_optimizer_params`,
`save_weights`, ...), so third-party modules such as `lycoris.kohya` train the same way ours do.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Dict, Optional

import torch

from library.errors import UserError
from library.models.text_encoder_view import plugin_text_encoders
from library.training.train_args import fp8_flag, parse_network_args
from library.training.run import Run, Task

logger = logging.getLogger(__name__)


def _read_checked(path: str) -> Dict[str, torch.Tensor]:
    from library.models.checkpoint_io import check_finite, read_checkpoint

    if not os.path.isfile(path):
        raise UserError(f"--network_weights {path}: no such file")
    tensors = read_checkpoint(path).tensors
    check_finite(tensors, path)
    return tensors


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in lines if "size mismatch" in line), lines[0] if lines else type(error).__name__)
    return detail.rstrip(".")


def shape_mismatch(expected: Dict[str, torch.Tensor], tensors: Dict[str, torch.Tensor], network_dim) -> str:
    """'' when every tensor both hold has the same shape, else a description of the first that does not:
    module, the two shapes, how many differ, and the rank the file was saved with (LoRA down weights)."""
    differ = [k for k in tensors if k in expected and tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if not differ:
        return ""
    key = next((k for k in differ if k.endswith("lora_down.weight")), differ[0])
    module, _, leaf = key.partition(".")
    rank = f"the file has rank {tensors[key].shape[0]}, " if key.endswith("lora_down.weight") else ""
    dim = "unset: the module's default" if network_dim is None else network_dim
    return (f"module {module} ({leaf}) has shape {tuple(tensors[key].shape)} in the file but "
            f"{tuple(expected[key].shape)} in this network, {len(differ)} tensor(s) differ "
            f"({rank}--network_dim is {dim})")


class NetworkTask(Task):
    name = "network"

    def __init__(self, sdxl: bool):
        self.sdxl = sdxl
        self._save_as = "safetensors"
        self.network = None
        self.module = None
        self.train_unet = True
        self.train_text_encoder = True
        self.metadata: Dict[str, str] = {}
        self._file_tensors = None
        self.network_dim = None

    @property
    def artifact_ext(self) -> str:  # noqa: D401 - property replaces the class attribute
        return "." + (self._save_as or "safetensors")

    def validate_args(self, args) -> None:
        self._save_as = args.save_model_as
        if args.network_dim is not None and args.network_dim < 1:
            raise UserError(f"--network_dim {args.network_dim}: the network's rank must be 1 or more (e.g. 4, 8 or 16)")
        if args.network_train_unet_only and args.network_train_text_encoder_only:
            raise UserError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
        if args.dim_from_weights and not args.network_weights:
            raise UserError("--dim_from_weights needs --network_weights")
        if getattr(args, "cache_text_encoder_outputs", False) and not args.network_train_unet_only:
            raise UserError("--cache_text_encoder_outputs needs --network_train_unet_only (cached outputs cannot train the text encoder)")
        if args.base_weights_multiplier and len(args.base_weights_multiplier) != len(args.base_weights or []):
            raise UserError("--base_weights_multiplier needs one value per --base_weights file")
        if not args.output_dir:
            raise UserError("--output_dir is required")
        # readable and finite, before the data scan and any model load
        self._file_tensors = _read_checked(args.network_weights) if args.network_weights else None

    def frozen_weights_may_stay_half(self, args) -> bool:
        # our modules only call the base layer; plugins (LyCORIS) also compute with its weight
        # tensor in its own dtype, so they get float32 base weights
        return args.network_module.startswith("networks.")

    def fp8_base_refusal(self, args) -> Optional[str]:
        # ours and LyCORIS in bypass mode only call the base layer; LyCORIS otherwise adds its
        # update to the base weight tensor, which in fp8 would round the update away
        if args.network_module.startswith("networks."):
            return None
        if args.network_module != "lycoris.kohya":
            return (f"--network_module {args.network_module} may compute with the base weights directly, which fp8 "
                    "holds scaled; fp8 works with networks.* modules and lycoris.kohya")
        kwargs = parse_network_args(args.network_args)
        if (kwargs.get("algo") or "lora").lower() == "full":
            return "LyCORIS algo=full trains the whole base weight, which fp8 cannot hold; drop the flag"
        if str(kwargs.get("dora_wd", False)).lower() != "false":
            return "LyCORIS dora_wd=True normalises the full base weight each step; drop dora_wd or the flag"
        if str(kwargs.get("bypass_mode", True)).lower() == "false":
            return ("LyCORIS needs bypass_mode=True with fp8 base weights (it otherwise adds its update to the fp8 "
                    "weight); drop bypass_mode=False")
        return None

    def _network_kwargs(self, args) -> dict:
        kwargs = parse_network_args(args.network_args)
        if fp8_flag(args) and args.network_module == "lycoris.kohya" and "bypass_mode" not in kwargs:
            # y = base(x) + ΔW·x: the same output as adding ΔW to the weight, without touching it
            logger.info("%s: LyCORIS runs in bypass mode (bypass_mode=True)", fp8_flag(args))
            kwargs["bypass_mode"] = "True"
        return kwargs

    def trains_text_encoder(self, index: int) -> bool:
        return self.train_text_encoder

    def trains_unet(self) -> bool:
        return self.train_unet

    def _text_encoder_arg(self, models, args):
        return plugin_text_encoders(args.network_module, models.text_encoders)

    def _import_module(self, name: str):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            hint = " (pip install -e .[lycoris])" if name.startswith("lycoris") else ""
            raise UserError(f"--network_module {name}: cannot import it ({e}){hint}") from None

    def merge_base_weights(self, models, args, precision) -> None:
        """--base_weights, merged on the CPU before the frozen weights are held (fp8 included) and before
        the network is made. LoRA and LyCORIS files go through `library.models.network_merge` (one formula
        for every tool; lycoris-lora's own merge_to scales LoKr and LoHa changes twice); other files
        through the plugin's merge_to."""
        if not args.base_weights:
            return
        from library.models import checkpoint_io, network_merge
        from library.models.network_deltas import group_modules

        te = self._text_encoder_arg(models, args)
        for i, path in enumerate(args.base_weights):
            multiplier = args.base_weights_multiplier[i] if args.base_weights_multiplier else 1.0
            weights = checkpoint_io.read_checkpoint(path).tensors
            if network_merge.understands(group_modules(weights)):
                network_merge.merge_into_models(weights, models.text_encoders, models.unet, multiplier, path,
                                                models.family.title)
            else:
                module = self._import_module(args.network_module)
                net, sd = module.create_network_from_weights(multiplier, path, models.vae, te, models.unet,
                                                             weights_sd=weights, for_inference=True)
                net.merge_to(te, models.unet, sd, precision.weight_dtype, "cpu")  # where the weights are, as sd-scripts does
            logger.info("merged base weights %s (multiplier %s)", path, multiplier)

    def setup(self, run: Run) -> None:
        args = run.args
        models = run.models
        self.network_dim = args.network_dim
        te = self._text_encoder_arg(models, args)
        self.module = self._import_module(args.network_module)
        kwargs = self._network_kwargs(args)

        if args.dim_from_weights:
            self.network, _ = self.module.create_network_from_weights(1.0, args.network_weights, models.vae, te, models.unet, **kwargs)
        else:
            if args.network_dropout is not None:
                kwargs["dropout"] = args.network_dropout
            self.network = self.module.create_network(
                1.0, args.network_dim, args.network_alpha, models.vae, te, models.unet,
                neuron_dropout=args.network_dropout, **kwargs,
            )
        if self.network is None:
            raise UserError(f"--network_module {args.network_module}: create_network returned nothing; check --network_args")
        if hasattr(self.network, "prepare_network"):
            self.network.prepare_network(args)
        self.train_unet = not args.network_train_text_encoder_only
        self.train_text_encoder = not args.network_train_unet_only
        self.network.apply_to(te, models.unet, self.train_text_encoder, self.train_unet)
        if args.network_weights:
            self._load_network_weights(args, self._file_tensors)
            self._file_tensors = None
        if hasattr(self.network, "set_multiplier"):
            self.network.set_multiplier(args.network_multiplier)
        self._batch_multiplier = args.network_multiplier
        self.network.to(run.device, dtype=run.precision.train_dtype)
        self.network.train()
        if args.gradient_checkpointing and hasattr(self.network, "enable_gradient_checkpointing"):
            self.network.enable_gradient_checkpointing()
        if hasattr(self.network, "prepare_grad_etc"):
            self.network.prepare_grad_etc(te, models.unet)
        if self.train_text_encoder:
            for encoder in models.text_encoders:
                encoder.to(run.device)

    def _load_network_weights(self, args, file_tensors: Dict[str, torch.Tensor]) -> None:
        path = args.network_weights
        if not args.dim_from_weights:
            mismatch = shape_mismatch(self.network.state_dict(), file_tensors, args.network_dim)
            if mismatch:
                raise UserError(f"--network_weights {path}: {mismatch}; add --dim_from_weights to take the ranks "
                                "from the file")
        try:
            info = self.network.load_weights(path)
        except RuntimeError as e:  # a plugin's own shape check: one line, not a state_dict report
            raise UserError(f"--network_weights {path}: does not fit this network ({_first_line(e)}); "
                            "add --dim_from_weights to take the ranks from the file") from None
        logger.info("loaded network weights %s: %s", path, info)

    def param_groups(self, run: Run) -> tuple:
        args = run.args
        te_lr = args.text_encoder_lr
        if isinstance(te_lr, list):
            te_lr = te_lr[0] if len(te_lr) == 1 else (te_lr or None)
        try:
            result = self.network.prepare_optimizer_params(te_lr, args.unet_lr, args.learning_rate)
        except TypeError:
            result = self.network.prepare_optimizer_params(te_lr, args.unet_lr)
        if isinstance(result, tuple):
            groups, descriptions = result
        else:
            groups, descriptions = result, []
        if not any(p.requires_grad for g in groups for p in (g["params"] if isinstance(g, dict) else [g])):
            raise UserError("nothing to train: every parameter group has learning rate 0 or no parameters")
        return groups, descriptions

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        return dict(self.network.state_dict())

    def load_trainable_state(self, tensors: Dict[str, torch.Tensor]) -> None:
        mismatch = shape_mismatch(self.network.state_dict(), tensors, self.network_dim)
        if mismatch:
            raise UserError(f"{mismatch}; resume with the --network_dim and --network_args the state was saved with")
        missing = sorted(set(self.network.state_dict()) - set(tensors))
        unexpected = sorted(set(tensors) - set(self.network.state_dict()))
        if missing or unexpected:
            which = f"this run has {missing[0]}, the state does not" if missing else f"the state has {unexpected[0]}, this run does not"
            raise UserError(f"holds other modules than this run's network ({which}); resume with the --network_module, "
                            "--network_args and --network_train_*_only flags the state was saved with")
        self.network.load_state_dict(tensors, strict=True)

    def before_step(self, run: Run, batch: dict) -> None:
        multipliers = batch.get("network_multipliers")
        if multipliers is not None and hasattr(self.network, "set_multiplier"):
            # a dataset's network_multiplier holds for its batches only: the next batch sets its own
            wanted = run.args.network_multiplier * float(multipliers.mean())
            if wanted != self._batch_multiplier:
                self.network.set_multiplier(wanted)
            self._batch_multiplier = wanted
        if hasattr(self.network, "on_step_start"):
            self.network.on_step_start()

    def after_step(self, run: Run) -> Dict[str, float]:
        if run.args.scale_weight_norms and hasattr(self.network, "apply_max_norm_regularization"):
            scaled, mean_norm, max_norm = self.network.apply_max_norm_regularization(run.args.scale_weight_norms, run.device)
            return {"max_norm/keys_scaled": float(scaled), "max_norm/average_key_norm": float(mean_norm),
                    "max_norm/max_key_norm": float(max_norm)}
        return {}

    def sampling_networks(self) -> list:
        return [self.network]

    def save(self, run: Run, path: str, epoch: int, step: int, final: bool) -> None:
        from library.training import network_metadata
        from library.models.saving import PRECISIONS

        args = run.args
        for name, tensor in self.network.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise UserError(f"step {step}: network weight {name} is not finite; nothing was saved")
        if not self.metadata:
            self.metadata = network_metadata.training_metadata(
                args, run, args.network_module, args.network_dim, args.network_alpha)
        metadata = network_metadata.finish(self.metadata, args, run, epoch, step, "lora")
        dtype = PRECISIONS.get(args.save_precision) if args.save_precision else None
        self.network.save_weights(path, dtype, metadata)
