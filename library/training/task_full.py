"""The full-model task: fine-tune the U-Net and optionally the text encoder(s) of a whole model.

One task serves three scripts, which differ only in which parts train at which learning rate
(spec/training-math.md §4):

* `train_db.py` ("db"): U-Net and text encoder, one group at `--learning_rate` or two with
  `--learning_rate_te`; the text encoder stops after `--stop_text_encoder_training` steps (−1: never
  trained);
* `fine_tune.py` ("fine_tune"): U-Net; the text encoder with `--train_text_encoder` at
  `--learning_rate_te` (None: the same group);
* `sdxl_train.py` ("sdxl"): U-Net at `--learning_rate` or per block with `--block_lr` (23 values, 0 =
  block frozen); text encoders 1/2 with `--train_text_encoder` at `--learning_rate_te1/te2` (None:
  `--learning_rate`, 0: frozen).

Everything else (loss with prior weights and every weighting flag, caching, sampling, saving
points, resume, EMA) is the shared loop's. The result is saved as a whole model with
`save_models`, in the format `--save_model_as` / `--use_safetensors` ask for (default: the kind of
the base model). `--fused_backward_pass` / `--fused_optimizer_groups` step each parameter as soon as
its gradient is complete (`FusedBackwardOptimizer`).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Dict, List, Optional

import torch

from library.errors import UserError
from library.training.run import Run, Task
from library.training.train_args import modelspec_flags

logger = logging.getLogger(__name__)

SCRIPTS = ("db", "fine_tune", "sdxl")
BLOCK_LR_COUNT = 23
_STEPS_KEY = "__task__.steps_done"  # in state folders: when the text encoder stopped is part of the state
# Optimizers whose update uses statistics over all parameters cannot be stepped one tensor at a time.
_NOT_PER_PARAMETER = ("dadapt", "prodigy", "schedulefree")


# ---------------------------------------------------------------------------------------------
# output format


def output_format(save_model_as: Optional[str], use_safetensors: bool, source: str) -> str:
    """sd-scripts' rule: None = the source's kind (single file: ckpt; diffusers: diffusers);
    `--use_safetensors` turns ckpt into safetensors and diffusers into diffusers_safetensors."""
    fmt = save_model_as or ("diffusers" if os.path.isdir(source or "") else "ckpt")
    if use_safetensors:
        fmt = {"ckpt": "safetensors", "diffusers": "diffusers_safetensors"}.get(fmt, fmt)
    return fmt


def format_extension(fmt: str) -> str:
    """File extension of a saved model; diffusers folders have none."""
    return {"ckpt": ".ckpt", "safetensors": ".safetensors"}.get(fmt, "")


# ---------------------------------------------------------------------------------------------
# SDXL --block_lr


def parse_block_lr(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--block_lr {text!r}: expected {BLOCK_LR_COUNT} comma-separated numbers") from None
    if len(values) != BLOCK_LR_COUNT:
        raise UserError(
            f"--block_lr has {len(values)} values; it needs {BLOCK_LR_COUNT}: time/label embedding, input blocks 0-8, "
            "middle blocks 0-2, output blocks 0-8, out"
        )
    if any(v < 0 for v in values):
        raise UserError(f"--block_lr {text!r}: learning rates must be 0 (frozen) or more")
    return values


def sgm_block_index(ldm_module: str) -> int:
    """The --block_lr index of an SGM U-Net module name (`input_blocks.4.1.proj_in` → 5)."""
    parts = ldm_module.split(".")
    if parts[0] in ("time_embed", "label_emb"):
        return 0
    if parts[0] == "input_blocks":
        return 1 + int(parts[1])
    if parts[0] == "middle_block":
        return 10 + int(parts[1])
    if parts[0] == "output_blocks":
        return 13 + int(parts[1])
    if parts[0] == "out":
        return BLOCK_LR_COUNT - 1
    raise ValueError(f"U-Net module {ldm_module!r} belongs to no --block_lr block")


def unet_block_indices(unet: torch.nn.Module) -> Dict[str, int]:
    """--block_lr index of every U-Net parameter, through the diffusers → SGM module names."""
    from library.models import unet_convert

    pairs = unet_convert.module_prefix_pairs(dict(unet.config))
    out = {}
    for name, _ in unet.named_parameters():
        module = name.rsplit(".", 1)[0]
        out[name] = sgm_block_index(unet_convert.diffusers_module_to_ldm(module, pairs))
    return out


# ---------------------------------------------------------------------------------------------
# stepping during the backward pass


class FusedBackwardOptimizer:
    """The optimizer seen by the loop when each parameter is stepped inside the backward pass.

    A hook on every trained tensor clips its gradient (per tensor, as sd-scripts' fused pass does),
    runs the real optimizer on that tensor alone and frees the gradient, so the full set of
    gradients never exists at once. The loop's own `step()` then has nothing left to do. Attribute
    access falls through to the real optimizer (param groups, state dicts, schedulers)."""

    steps_in_backward = True  # the loop skips its own gradient sync, clipping and step

    def __init__(self, optimizer, max_grad_norm: float):
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.handles = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                self.handles.append(p.register_post_accumulate_grad_hook(functools.partial(self._step_one, group)))

    def _step_one(self, group: dict, param: torch.Tensor) -> None:
        opt = self.optimizer
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm)
        # The real group dict with only this tensor in it: group-level values the optimizer reads
        # (the scheduler's lr) are current, and anything it writes back stays.
        groups, params = opt.param_groups, group["params"]
        opt.param_groups, group["params"] = [group], [param]
        try:
            opt.step()
        finally:
            opt.param_groups, group["params"] = groups, params
        param.grad = None

    def step(self, closure=None):
        return None  # every tensor was stepped during the backward pass

    def __getattr__(self, name: str):
        return getattr(self.__dict__["optimizer"], name)


# ---------------------------------------------------------------------------------------------
# trained modules


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    # torch's own `to`: diffusers' override warns about fp32-only modules on every dtype change,
    # even when a model has none
    torch.nn.Module.to(module, device=device, dtype=dtype)
    _own_storage(module)


def _own_storage(module: torch.nn.Module) -> None:
    """Give every parameter a storage (and version counter) of its own. Loading may leave slices of
    one tensor (OpenCLIP's q/k/v in_proj) sharing them: an in-place step of one slice during the
    backward pass (--fused_backward_pass) would then invalidate the others' saved values."""
    for owner in module.modules():
        for name, p in list(owner._parameters.items()):
            if p is not None and (p._is_view() or p.untyped_storage().nbytes() > p.numel() * p.element_size()):
                owner._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)


def _checkpoint_text_encoder(encoder) -> None:
    options = {"use_reentrant": False}  # reentrant checkpoints need inputs that require grad
    if hasattr(encoder, "activation_checkpointing_enable"):  # transformers ≥ 5 (the old name is deprecated)
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


# ---------------------------------------------------------------------------------------------
# the task


class FullModelTask(Task):
    name = "full model"
    saves_vae = True  # every saved checkpoint holds the VAE

    def __init__(self, script: str):
        if script not in SCRIPTS:
            raise ValueError(f"script must be one of {SCRIPTS}")
        self.script = script
        self.sdxl = script == "sdxl"
        self.format = "safetensors"
        self.run: Optional[Run] = None
        self.unet_lr: Optional[float] = None
        self.block_lrs: Optional[List[float]] = None
        self.te_lrs: List[Optional[float]] = []  # per text encoder; None = not trained
        self.te_active: List[bool] = []  # per text encoder: trained at this step
        self.stop_te_after: Optional[int] = None
        self.steps_done = 0
        self.trained: Dict[str, torch.nn.Parameter] = {}  # state-folder key → parameter
        self.fused = False
        self._block_of: Optional[Dict[str, int]] = None  # U-Net parameter → --block_lr index

    @property
    def artifact_ext(self) -> str:  # noqa: D401 - property replaces the class attribute
        return format_extension(self.format)

    # --- arguments ----------------------------------------------------------------------------

    def validate_args(self, args) -> None:
        if not args.output_dir:
            raise UserError("--output_dir is required")
        self.format = output_format(args.save_model_as, args.use_safetensors, args.pretrained_model_name_or_path)
        if self.script == "fine_tune" and not args.in_json and not args.dataset_config:
            raise UserError("fine_tune.py needs --in_json (metadata from finetune/merge_*_to_metadata.py) "
                            "or --dataset_config")
        stop = getattr(args, "stop_text_encoder_training", None)
        if stop is not None and stop < -1:
            raise UserError(f"--stop_text_encoder_training {stop}: use a step count, or -1 to never train the text encoder")
        if getattr(args, "no_token_padding", False):
            logger.info("--no_token_padding has no effect (as in sd-scripts); captions are padded as usual")
        if getattr(args, "diffusers_xformers", False):
            args.xformers = True
        if self.sdxl and args.block_lr:
            self.block_lrs = parse_block_lr(args.block_lr)
        self._plan_learning_rates(args)
        caching = any(getattr(args, name, False) for name in
                      ("cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk"))
        if caching and any(lr is not None for lr in self.te_lrs):
            raise UserError("--cache_text_encoder_outputs needs frozen text encoders; drop --train_text_encoder "
                            "(or set --learning_rate_te1 0 --learning_rate_te2 0)")
        self.fused = bool(args.fused_backward_pass or getattr(args, "fused_optimizer_groups", None))
        if self.fused:
            self._check_fused(args)

    def _plan_learning_rates(self, args) -> None:
        """Which parts train at which rate (None = frozen), per script."""
        lr = args.learning_rate
        count = 2 if self.sdxl else 1
        if self.script == "db":
            stop = args.stop_text_encoder_training
            te_lr = lr if args.learning_rate_te is None else args.learning_rate_te
            trains_te = stop is None or stop > 0  # 0 stops before the first step: same as -1
            self.te_lrs = [te_lr if trains_te else None]
            self.stop_te_after = stop if trains_te else None
        elif self.script == "fine_tune":
            te_lr = lr if args.learning_rate_te is None else args.learning_rate_te
            self.te_lrs = [te_lr if args.train_text_encoder else None]
        else:
            given = [args.learning_rate_te1, args.learning_rate_te2]
            self.te_lrs = [(lr if v is None else v) if args.train_text_encoder else None for v in given][:count]
        self.te_lrs = [None if v == 0 else v for v in self.te_lrs]  # a part with lr 0 is frozen
        self.te_active = [v is not None for v in self.te_lrs]
        if self.block_lrs is not None:
            self.unet_lr = None if not any(self.block_lrs) else lr
        else:
            self.unet_lr = None if not lr else lr

    def _check_fused(self, args) -> None:
        from library.training.optimizers import resolve_optimizer_type

        name = resolve_optimizer_type(args).lower()
        if any(word in name for word in _NOT_PER_PARAMETER):
            raise UserError(f"--fused_backward_pass/--fused_optimizer_groups step one tensor at a time; "
                            f"--optimizer_type {args.optimizer_type} needs all of them at once")
        if (args.gradient_accumulation_steps or 1) != 1:
            raise UserError("--fused_backward_pass/--fused_optimizer_groups need --gradient_accumulation_steps 1")

    # --- set-up -------------------------------------------------------------------------------

    def trains_unet(self) -> bool:
        return self.unet_lr is not None

    def fp8_base_refusal(self, args) -> Optional[str]:
        if not self.trains_unet():
            return None  # a frozen U-Net (learning rate 0) may be held in fp8 like any frozen part
        script = {"db": "train_db.py", "fine_tune": "fine_tune.py", "sdxl": "sdxl_train.py"}[self.script]
        return (f"{script} trains the U-Net's own weights, and fp8 holds only frozen ones (sd-scripts reads the flag "
                "in train_network.py only); drop the flag, or train a LoRA with --fp8_base")

    def trains_text_encoder(self, index: int) -> bool:
        return index < len(self.te_active) and self.te_active[index]

    def load_dtypes(self, precision) -> Dict[str, torch.dtype]:
        """Trained parts are read in their training dtype (float32 under --mixed_precision without
        --full_fp16/bf16): training starts from the file's exact values, and nothing is read twice."""
        parts = {"unet": precision.train_dtype} if self.trains_unet() else {}
        for i, spec in enumerate(self._text_encoder_parts()):
            if self.trains_text_encoder(i):
                parts[spec] = precision.train_dtype
        return parts

    def _text_encoder_parts(self) -> List[str]:
        return ["text_encoder", "text_encoder_2"][:2 if self.sdxl else 1]

    def setup(self, run: Run) -> None:
        self.run = run
        if self.fused and run.num_processes > 1:
            raise UserError("--fused_backward_pass/--fused_optimizer_groups run on one process; launch without multi-GPU")
        models = run.models
        dtype = run.precision.train_dtype
        if self.trains_unet():
            _move(models.unet, run.device, dtype)
            models.unet.requires_grad_(True)
            models.unet.train()
            if self.block_lrs is not None:
                for name, p in models.unet.named_parameters():
                    if self.block_lrs[self._block_index(name)] == 0:
                        p.requires_grad_(False)
            self.trained.update({f"unet.{n}": p for n, p in models.unet.named_parameters() if p.requires_grad})
        for i, encoder in enumerate(models.text_encoders):
            if not self.trains_text_encoder(i):
                continue
            _move(encoder, run.device, dtype)
            encoder.requires_grad_(True)
            encoder.train()
            if run.args.gradient_checkpointing:
                _checkpoint_text_encoder(encoder)
            folder = run.family.text_encoders[i].diffusers_subfolder
            self.trained.update({f"{folder}.{n}": p for n, p in encoder.named_parameters()})
        if not self.trained:
            raise UserError("nothing to train: every part has learning rate 0 or is frozen "
                            "(check --learning_rate, --block_lr, --train_text_encoder, --stop_text_encoder_training)")
        logger.info("training %s", ", ".join(self._part_names()))

    def _part_names(self) -> List[str]:
        parts = ["U-Net" + (" (--block_lr)" if self.block_lrs else "")] if self.trains_unet() else []
        parts += [f"text encoder {i + 1}" for i, active in enumerate(self.te_active) if active]
        return parts

    def _block_index(self, name: str) -> int:
        if self._block_of is None:
            self._block_of = unet_block_indices(self.run.models.unet)
        return self._block_of[name]

    def param_groups(self, run: Run) -> tuple:
        groups, names = [], []
        unet = run.models.unet
        if self.trains_unet() and self.block_lrs is not None:
            by_block: Dict[int, list] = {}
            for name, p in unet.named_parameters():
                if p.requires_grad:
                    by_block.setdefault(self._block_index(name), []).append(p)
            for index in sorted(by_block):
                groups.append({"params": by_block[index], "lr": self.block_lrs[index]})
                names.append(f"unet_block{index}")
        elif self.trains_unet():
            groups.append({"params": [p for p in unet.parameters() if p.requires_grad], "lr": self.unet_lr})
            names.append("unet")
        for i, encoder in enumerate(run.models.text_encoders):
            if not self.trains_text_encoder(i):
                continue
            params = list(encoder.parameters())
            one_group = self.script != "sdxl" and run.args.learning_rate_te is None and groups
            if one_group:  # train_db / fine_tune without --learning_rate_te: U-Net and TE share a group
                groups[0]["params"] = groups[0]["params"] + params
                names[0] = "unet+text_encoder"
            else:
                groups.append({"params": params, "lr": self.te_lrs[i]})
                names.append("text_encoder" if len(run.models.text_encoders) == 1 else f"text_encoder{i + 1}")
        return groups, names

    # --- steps --------------------------------------------------------------------------------

    def wrap_optimizer(self, run: Run, optimizer):
        return FusedBackwardOptimizer(optimizer, run.args.max_grad_norm) if self.fused else optimizer

    def after_step(self, run: Run) -> Dict[str, float]:
        self.steps_done += 1
        if self.stop_te_after is not None and self.steps_done == self.stop_te_after:
            self._stop_text_encoders(run)
        return {}

    def _stop_text_encoders(self, run: Run) -> None:
        """--stop_text_encoder_training: the text encoder leaves the optimizer (and its state), so
        momentum cannot move it further; captions are then encoded without gradients."""
        optimizer = run.optimizer
        stopped = {id(p) for i, e in enumerate(run.models.text_encoders) if self.te_active[i] for p in e.parameters()}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in stopped]
        for i, encoder in enumerate(run.models.text_encoders):
            if not self.te_active[i]:
                continue
            for p in encoder.parameters():
                optimizer.state.pop(p, None)
                p.requires_grad_(False)
                p.grad = None
            encoder.eval()
            self.te_active[i] = False
        logger.info("text encoder training stopped after step %d (--stop_text_encoder_training)", self.steps_done)

    # --- state and saving ---------------------------------------------------------------------

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        tensors = dict(self.trained)
        tensors[_STEPS_KEY] = torch.tensor([self.steps_done], dtype=torch.int64)
        return tensors

    def load_trainable_state(self, tensors: Dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        steps = tensors.pop(_STEPS_KEY, None)
        missing = sorted(set(self.trained) - set(tensors))
        unexpected = sorted(set(tensors) - set(self.trained))
        if missing or unexpected:
            raise UserError(
                f"--resume: the state does not match what this run trains (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); resume with the same script and --train_text_encoder/--block_lr settings"
            )
        with torch.no_grad():
            for key, p in self.trained.items():
                p.copy_(tensors[key].to(p.device, p.dtype))
        self.steps_done = int(steps.reshape(-1)[0]) if steps is not None else 0
        if self.stop_te_after is not None and self.steps_done >= self.stop_te_after:
            self._stop_text_encoders(self.run)  # before the optimizer state, which was saved without it

    def save(self, run: Run, path: str, epoch: int, step: int, final: bool) -> None:
        from library.models.saving import PRECISIONS, save_models

        for key, p in self.trained.items():
            if not torch.isfinite(p).all():
                raise UserError(f"step {step}: weight {key} is not finite; nothing was saved. Lower --learning_rate "
                                "or use --mixed_precision bf16 instead of fp16")
        args = run.args
        precision = PRECISIONS.get(args.save_precision) if args.save_precision else None
        metadata = self._metadata(run) if self.format == "safetensors" else None
        save_models(run.models, path, self.format, precision, metadata, epoch, step, tokenizers=run.tokenizers)

    def _metadata(self, run: Run) -> Dict[str, str]:
        from library.models import modelspec

        args = run.args
        datasets = run.dataset.scan.datasets if run.dataset is not None else []
        resolution = datasets[0].params.resolution if datasets else None
        extra = modelspec_flags(args)
        timesteps = (args.min_timestep, args.max_timestep)
        return modelspec.build_metadata(
            run.family, run.models.v_parameterization, args.metadata_title or args.output_name or "last",
            resolution=tuple(resolution) if resolution else None,
            timestep_range=timesteps if any(t is not None for t in timesteps) else None,
            clip_skip=args.clip_skip if not run.family.is_sdxl else None, extra=extra,
        )
