"""The training loop every trainer shares, parameterised by a model family and a task.

Read top to bottom, `train()` does: scan the data (before any model loads), set up devices and
precision, load the model, let the task make its parameters trainable (inject a LoRA, unfreeze a
U-Net, add embedding rows...), build caches, optimizer and scheduler, resume, then loop over steps.

Reproducibility is by construction: the batch order of an epoch is a function of (seed, epoch),
and every random draw of a step (noise, timesteps, dropout) comes from generators seeded by
(seed, step, micro-batch). A resumed run therefore replays exactly what an uninterrupted run does,
with only the weights, optimizer and scheduler restored from the state folder.
"""

from __future__ import annotations

import logging
import math
import os
import random
from typing import Optional

import torch

from library.errors import UserError
from library.training.grad_sync import average_gradients
from library.training.run import Run, Task, step_generator
from library.training.train_args import fp8_flag
from library.training.step_loss import micro_step_loss
from library.training.validation import Validator

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# set-up


def peek_family(args, sdxl: Optional[bool]):
    """The model family from a cheap look at the model (safetensors header or diffusers configs),
    else from the flags: enough to scan and check the dataset before anything loads."""
    from library.models import checkpoint_io, detect
    from library.models.families import SD1, SD2, SDXL, get_family

    path = args.pretrained_model_name_or_path
    try:
        if path and os.path.isdir(path):
            return get_family(detect.detect_diffusers_folder(path))
        if path and os.path.isfile(path) and checkpoint_io.sniff_format(path) == "safetensors":
            return get_family(detect.detect_single_file(path, checkpoint_io.read_keys(path)))
    except UserError:
        pass  # the real load reports it properly
    if sdxl:
        return SDXL
    return SD2 if getattr(args, "v2", False) else SD1


def _run_seed(args) -> int:
    """--seed, else a resumed state's seed, else a random one; written back to args (metadata)."""
    from library.training.train_state import read_position

    seed = args.seed
    if args.resume:
        state_seed = read_position(args.resume).seed
        if seed is not None and seed != state_seed:
            logger.info("resume: using the state's seed %d instead of --seed %d", state_seed, seed)
        seed = state_seed
    if seed is None:
        seed = random.randint(0, 2**31 - 1)
    args.seed = seed
    return seed


def _check_run_trains(args) -> None:
    """A run that would train nothing is refused: it would only overwrite a model with an untrained one."""
    if args.max_train_epochs is not None and args.max_train_epochs < 1:
        raise UserError(f"--max_train_epochs {args.max_train_epochs}: a run trains at least 1 epoch")
    if args.max_train_epochs is None and (args.max_train_steps is None or args.max_train_steps < 1):
        raise UserError(f"--max_train_steps {args.max_train_steps}: a run trains at least 1 step "
                        "(nothing would be trained, and the saved file would be the untrained network)")


def _frozen_parts(args, precision, device: torch.device, trained_parts: dict, task: Task) -> tuple:
    """(parts read in the file's own dtype, parts whose frozen layers `library.models.frozen_weights` holds).

    A float32 run reads the frozen U-Net / text encoders / VAE in the file's dtype: when that is fp16
    or bf16, the held layers compute with them in float32 at half the memory, exactly. A bf16 run on
    CPU reads them in bf16 and holds the U-Net and text encoders for the CPU paths of those layers
    (small-map convolutions by GEMM, without oneDNN's per-call weight reorder)."""
    if getattr(args, "base_weights", None):
        return [], []  # merged --base_weights need the plain layers' weights
    frozen = []
    if task.frozen_weights_may_stay_half(args):
        frozen = [part for part in ("unet", "text_encoder", "text_encoder_2") if part not in trained_parts]
    if precision.weight_dtype == torch.float32:
        # the VAE only encodes (and decodes samples) unless the task saves it
        parts = frozen + ([] if task.saves_vae or args.no_half_vae else ["vae"])
        return parts, parts
    if precision.weight_dtype == torch.bfloat16 and device.type == "cpu":
        return [], frozen
    return [], []


def _fp8_parts(args, trained_parts: dict) -> list:
    """The parts whose frozen Linear/Conv2d weights are held in fp8: the U-Net, and with --fp8_base
    (without --fp8_base_unet) the text encoders too, as sd-scripts' train_network.py does."""
    flag = fp8_flag(args)
    if flag is None:
        return []
    parts = ["unet"] + (["text_encoder", "text_encoder_2"] if flag == "--fp8_base" else [])
    return [part for part in parts if part not in trained_parts]


def _hold_frozen(models, parts: list, compute_dtype: torch.dtype, fp8: bool = False) -> None:
    from library.models.frozen_weights import hold_in_fp8, hold_in_half

    modules = {"unet": models.unet, "vae": models.vae}
    modules.update({spec.diffusers_subfolder: te for spec, te in zip(models.family.text_encoders, models.text_encoders)})
    hold = hold_in_fp8 if fp8 else hold_in_half
    kept = sum(hold(modules[part], compute_dtype) for part in parts if part in modules)
    if fp8 and parts:
        logger.info("frozen %s weights held in float8_e4m3fn (%.2f GiB with the embeddings), computed in %s",
                    "/".join(part for part in parts if part in modules), kept / 2**30, str(compute_dtype).split(".")[-1])
    elif kept and compute_dtype == torch.float32:
        logger.info("frozen weights kept in the checkpoint's half precision (%.2f GiB), computed in float32", kept / 2**30)


def _freeze(module: torch.nn.Module) -> None:
    module.requires_grad_(False)
    module.eval()


def prepare_run(args, task: Task):
    """Everything before the first step; an int (exit status) when --dataset_check ends the run."""
    from library.data.check import run_dataset_check, scan_from_args
    from library.models.device_setup import make_accelerator, resolve_precision, set_attention
    from library.models.loading import load_models
    from library.training.noise import make_noise_scheduler, snr_table
    from library.text.encoding import TextConditioner, training_clip_skip
    from library.text.tokenizer import load_tokenizers
    from library.data.train_dataset import TrainDataset
    from library.training.train_math import LossSettings, NoiseSettings

    task.validate_args(args)
    if fp8_flag(args) and task.fp8_base_refusal(args):
        raise UserError(f"{fp8_flag(args)}: {task.fp8_base_refusal(args)}")
    seed = _run_seed(args)
    if args.validation_seed is None:
        args.validation_seed = seed  # every process, and a resumed run, holds out the same images

    # 1. the data, before any model: bad files stop the run here, not an hour in
    family = peek_family(args, task.sdxl)
    if args.dataset_check:
        return run_dataset_check(args, family, **task.dataset_support)
    _check_run_trains(args)
    if args.output_dir:
        from library.training.save_policy import prepare_output_dir

        prepare_output_dir(args.output_dir, args.output_name or "last")
    scan = scan_from_args(args, family, **task.dataset_support)
    scan.raise_for_problems()
    task.check_data(scan, args)
    if args.debug_dataset:
        return _debug_dataset(args, family, scan, seed)

    # 2. processes, device, precision
    accelerator = make_accelerator(args)
    device = accelerator.device
    precision = resolve_precision(args, device)
    if not args.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required (a local .safetensors/.ckpt file or diffusers folder)")

    # 3. the model, each part read once in the precision it will run in
    part_dtypes = {}
    if args.no_half_vae or precision.weight_dtype == torch.float16 and family.is_sdxl:
        part_dtypes["vae"] = torch.float32  # SDXL's VAE overflows in float16
    trained_parts = task.load_dtypes(precision)
    part_dtypes.update(trained_parts)
    frozen_in_file_dtype, held = _frozen_parts(args, precision, device, trained_parts, task)
    fp8_parts = _fp8_parts(args, trained_parts)
    held = [part for part in held if part not in fp8_parts]
    for part in frozen_in_file_dtype + fp8_parts:
        part_dtypes[part] = None  # None: the file's own dtype (fp8 parts are quantised from it)
    models = load_models(
        args.pretrained_model_name_or_path,
        v2=True if getattr(args, "v2", False) else None,
        v_parameterization=True if args.v_parameterization else None,
        sdxl=task.sdxl,
        dtype=precision.weight_dtype,
        vae=args.vae,
        part_dtypes=part_dtypes,
        zero_copy=False if getattr(args, "disable_mmap_load_safetensors", False) else None,
    )
    family = models.family
    clip_skip, warning = training_clip_skip(family, args.clip_skip)
    if warning:
        logger.warning(warning)
    args.clip_skip = clip_skip
    tokenizers = load_tokenizers(family, args.pretrained_model_name_or_path, args.tokenizer_cache_dir)
    for module in [models.unet, models.vae, *models.text_encoders]:
        _freeze(module)
    task.merge_base_weights(models, args, precision)  # into the weights as loaded, before any is held
    _hold_frozen(models, held, precision.weight_dtype)
    _hold_frozen(models, fp8_parts, precision.weight_dtype, fp8=True)
    if args.no_half_vae or precision.weight_dtype == torch.float16 and family.is_sdxl:
        models.vae.to(torch.float32)
    models.unet.to(device)
    models.vae.to(device)
    for te in models.text_encoders:
        te.to(device)
    set_attention(models.unet, args, device)
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        models.unet.train()  # diffusers checkpoints only in training mode; dropout-free modules, so safe

    noise_scheduler = make_noise_scheduler(args.zero_terminal_snr, models.v_parameterization)
    noise_settings = NoiseSettings.from_args(args, v_parameterization=models.v_parameterization)
    loss_settings = LossSettings.from_args(args, v_parameterization=models.v_parameterization)
    conditioner = TextConditioner(family, tokenizers, models.text_encoders)

    run = Run(
        args=args, accelerator=accelerator, device=device, precision=precision, family=family, models=models,
        tokenizers=tokenizers, conditioner=conditioner, dataset=None, noise_scheduler=noise_scheduler,
        snr=snr_table(noise_scheduler).to(device), noise_settings=noise_settings, loss_settings=loss_settings, seed=seed,
    )

    # 4. the task makes its parameters trainable; initial weights depend on the seed alone, so every
    # process of a multi-process run starts from the same ones
    torch.manual_seed(seed)
    task.setup(run)
    run.extra["task"] = task
    if args.torch_compile:
        _compile_unet(run)

    # 5. the dataset, and the caches it reads latents and text-encoder outputs from
    from library.caching.training_caches import attach_caches

    run.dataset = TrainDataset.from_args(scan, family, tokenizers, args, seed=seed)
    if any(dataset.validation for dataset in scan.datasets):
        run.extra["validation_dataset"] = TrainDataset.from_args(scan, family, tokenizers, args, seed=seed,
                                                                 split="validation")
    task.configure_dataset(run)
    attach_caches(run, task)

    # 6. schedule: steps, epochs
    batches = run.dataset.num_batches(1)
    per_step = args.gradient_accumulation_steps * accelerator.num_processes
    run.steps_per_epoch = max(1, math.ceil(batches / per_step))
    if args.max_train_epochs:
        run.max_steps = args.max_train_epochs * run.steps_per_epoch
    else:
        run.max_steps = args.max_train_steps
    run.num_epochs = math.ceil(run.max_steps / run.steps_per_epoch)

    # 7. optimizer and scheduler
    from library.training.lr_schedulers import build_lr_scheduler
    from library.training.optimizers import build_optimizer

    groups, descriptions = task.param_groups(run)
    run.extra["group_descriptions"] = descriptions
    run.optimizer_name, run.optimizer_args, optimizer = build_optimizer(args, groups)
    run.lr_scheduler = build_lr_scheduler(args, optimizer, run.max_steps, accelerator.num_processes)
    run.optimizer = task.wrap_optimizer(run, optimizer)
    return run


def _debug_dataset(args, family, scan, seed: int) -> int:
    """--debug_dataset: write the batches the run would train on (library/data/debug_dataset.py); exit 0."""
    from library.data.debug_dataset import planned_batches, write_debug_batches
    from library.data.train_dataset import TrainDataset
    from library.text.tokenizer import load_tokenizers

    tokenizers = load_tokenizers(family, args.pretrained_model_name_or_path, args.tokenizer_cache_dir)
    dataset = TrainDataset.from_args(scan, family, tokenizers, args, seed=seed)
    summary = write_debug_batches(dataset, args.output_dir or ".", planned_batches(dataset, args),
                                  args.gradient_accumulation_steps)
    for line in summary.lines():
        logger.info(line)
    return 0


def _compile_unet(run: Run) -> None:
    """--torch_compile: compile the U-Net in place (its parameter names, and so every saved file,
    stay as they are), after the task has patched or unfrozen it."""
    backend = (run.args.dynamo_backend or "inductor").lower()
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise UserError(f"--dynamo_backend {backend}: unknown to this torch; use one of {', '.join(sorted(known))}")
    logger.info("compiling the U-Net with torch.compile (backend %s); the first steps are slow", backend)
    run.models.unet.compile(backend=backend)


# ---------------------------------------------------------------------------------------------
# one step


# ---------------------------------------------------------------------------------------------
# the loop


def _check_finite(run: Run, loss: torch.Tensor, step: int, batch: dict) -> None:
    if not torch.isfinite(loss):
        paths = ", ".join(os.path.basename(p) for p in batch.get("image_paths", []))
        raise UserError(
            f"step {step}: the loss is {loss.item()} (not finite) on images [{paths}]; stopped without saving this "
            "step. Lower --learning_rate, use --mixed_precision bf16 instead of fp16, or check those images"
        )


def _resume(run: Run, task: Task):
    from library.training import ema
    from library.training.train_state import load_state

    from library.training.train_state import WEIGHTS_FILE, resolve_state_folder

    folder = resolve_state_folder(run.args.resume)
    tensors, opt_state, sched_state, position, _ = load_state(folder)
    ema_tensors, tensors = ema.split_state(tensors)
    try:
        task.load_trainable_state(tensors)
    except UserError as e:
        raise UserError(f"--resume: {os.path.join(folder, WEIGHTS_FILE)}: {e}") from None
    except RuntimeError as e:  # the task's own strict load: one line, not torch's per-tensor report
        raise UserError(f"--resume: {os.path.join(folder, WEIGHTS_FILE)}: does not fit this run "
                        f"({str(e).strip().splitlines()[0]}); resume with the settings the state was saved with") from None
    if run.extra.get("ema") is not None:  # EMA: the shadow weights continue from the state
        run.extra["ema"].load_state_tensors(ema_tensors, f"--resume {run.args.resume}")
    try:
        run.optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--resume: {folder}: the optimizer state does not fit this run's optimizer ({e}); resume "
                        "with the --optimizer_type, --optimizer_args and learning rates the state was saved with") from None
    if run.lr_scheduler is not None and sched_state:
        run.lr_scheduler.load_state_dict(sched_state)
    logger.info("resumed from %s at epoch %d, step %d", run.args.resume, position.epoch, position.step)
    return position


def _initial_step(run: Run, resumed: Optional[int]) -> int:
    """Where the loop starts: a resumed state's step, or --initial_step / --initial_epoch (which
    override it). Without --skip_until_initial_step a given start is rounded down to the start
    of its epoch (sd-scripts then only moves the epoch count); with it, it is that exact step: the
    data position follows, skipped without loading anything, as batch order is a function of the epoch."""
    args = run.args
    if args.initial_step is None and args.initial_epoch is None:
        return resumed or 0
    if args.initial_step is not None:
        if args.initial_step < 0:
            raise UserError(f"--initial_step {args.initial_step}: must be 0 or more")
        step, given = args.initial_step, f"--initial_step {args.initial_step}"
    else:
        if args.initial_epoch < 1:
            raise UserError(f"--initial_epoch {args.initial_epoch}: epochs count from 1")
        step, given = (args.initial_epoch - 1) * run.steps_per_epoch, f"--initial_epoch {args.initial_epoch}"
    if step >= run.max_steps:
        raise UserError(f"{given} starts at step {step}, but the run has only {run.max_steps} steps; "
                        "raise --max_train_steps / --max_train_epochs")
    if resumed is not None and resumed != step:
        logger.warning("%s replaces the state's step %d", given, resumed)
    if not args.skip_until_initial_step:
        step -= step % run.steps_per_epoch
    if resumed is None:
        logger.info("%s: starting at step %d (epoch %d); the learning-rate schedule starts from its beginning",
                    given, step, step // run.steps_per_epoch + 1)
    return step


def _sample(run: Run, task: Task, step: int, epoch: Optional[int]) -> None:
    from library.training import ema
    from library.training.optimizers import optimizer_eval_mode, optimizer_train_mode
    from library.generation.sampling import sample_images

    optimizer_eval_mode(run.optimizer)
    with ema.weights(run.extra.get("ema"), getattr(run.args, "sample_ema", False)):  # EMA: --sample_ema
        sample_images(run, step, epoch, run.args.sample_prompts, run.args.sample_sampler, run.args.output_dir,
                      networks=task.sampling_networks(), replacements=task.prompt_replacements(),
                      control_nets=task.sampling_control_nets())
    optimizer_train_mode(run.optimizer)


def _sample_due(args, step: int, finished_epoch: Optional[int]) -> bool:
    """sd-scripts' rule: --sample_every_n_epochs, when given, replaces --sample_every_n_steps."""
    if not args.sample_prompts:
        return False
    if args.sample_every_n_epochs:
        return finished_epoch is not None and args.sample_every_n_epochs > 0 and finished_epoch % args.sample_every_n_epochs == 0
    return finished_epoch is None and bool(args.sample_every_n_steps) and step % args.sample_every_n_steps == 0


def _save_between_steps(run: Run, task: Task, policy, epoch: int, step: int, kind: str) -> None:
    from library.training.optimizers import optimizer_eval_mode, optimizer_train_mode

    optimizer_eval_mode(run.optimizer)  # schedule-free optimizers save their averaged weights
    _save_point(run, task, policy, epoch, step, kind)
    optimizer_train_mode(run.optimizer)


def _save_point(run: Run, task: Task, policy, epoch: int, step: int, kind: str) -> None:
    """epoch: the 1-based number used in file names. A state records `step`, which is all a resumed
    run needs to find its place (every epoch has the same number of steps)."""
    from library.training.train_state import Position
    from library.training import ema
    from library.training import save_policy as names
    from library.training.train_state import save_state

    run.accelerator.wait_for_everyone()
    if not run.is_main:
        return
    if kind == "epoch":
        file, state = names.epoch_name(policy.name, epoch, policy.ext), names.epoch_state_name(policy.name, epoch)
    elif kind == "step":
        file, state = names.step_name(policy.name, step, policy.ext), names.step_state_name(policy.name, step)
    else:
        file, state = names.final_name(policy.name, policy.ext), names.final_state_name(policy.name)
        if step == 0:  # nothing was trained: an existing file must not be replaced by the untrained weights
            raise UserError(f"no step was trained; {policy.path(file)} was not written")
    with ema.weights(run.extra.get("ema"), getattr(run.args, "save_ema", False)):  # EMA: --save_ema
        task.save(run, policy.path(file), epoch, step, final=kind == "final")
    logger.info("saved %s", policy.path(file))
    want_state = policy.save_state if kind != "final" else (run.args.save_state or run.args.save_state_on_train_end)
    if want_state:
        position = Position(epoch=step // run.steps_per_epoch, step=step,
                            batch_in_epoch=(step % run.steps_per_epoch) * run.args.gradient_accumulation_steps * run.num_processes,
                            seed=run.seed)
        tensors = dict(task.trainable_state())
        if run.extra.get("ema") is not None:  # EMA: the shadow weights go into the state too
            tensors.update(run.extra["ema"].state_tensors())
        save_state(policy.path(state), tensors, run.optimizer, run.lr_scheduler, position)
    if kind == "epoch":
        policy.prune_after_epoch(epoch)
    elif kind == "step":
        policy.prune_after_step(step)


def train(args, task: Task):
    """Run training; returns the Run, or an exit status when --dataset_check was asked."""
    from tqdm import tqdm

    from library.training.ema import EMA
    from library.training.epoch_jobs import EpochJobs, by_step, epoch_loader
    from library.training.optimizers import optimizer_eval_mode, optimizer_train_mode
    from library.training.save_policy import SavePolicy
    from library.training.train_logging import TrainLogger
    from library.caching.training_caches import finish_latent_cache

    run = prepare_run(args, task)
    if isinstance(run, int):
        return run
    os.makedirs(args.output_dir, exist_ok=True)
    policy = SavePolicy.from_args(args, task.artifact_ext, run.num_epochs)
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    ema = run.extra["ema"] = EMA.from_args(args, params)  # EMA: None without --ema_decay
    stepped_in_backward = getattr(run.optimizer, "steps_in_backward", False)

    resumed = _resume(run, task).step if args.resume else None
    step = _initial_step(run, resumed)
    validator = Validator.from_run(run, task)
    tracker = TrainLogger(run)
    logger.info(
        "training %s on %s: %d steps, %d epochs, %d batches per epoch, batch size %d, %s",
        task.name, run.device, run.max_steps, run.num_epochs, run.dataset.num_batches(1), args.train_batch_size,
        run.precision.mixed_precision if run.precision.mixed_precision != "no" else "float32",
    )
    progress = tqdm(total=run.max_steps, initial=step, disable=not run.is_main, desc="steps", smoothing=0.1)
    if args.sample_at_first and args.sample_prompts and step == 0:
        _sample(run, task, 0, 0)
    optimizer_train_mode(run.optimizer)
    per_epoch = run.steps_per_epoch  # every epoch has this many steps, so the step number says where we are
    while step < run.max_steps:
        epoch = step // per_epoch  # finished epochs
        jobs = EpochJobs(run, epoch + 1, step, step % per_epoch)
        for _, micro in by_step(epoch_loader(run, jobs)):
            total = 0.0
            for index, batch in micro:
                task.before_step(run, batch)
                generator = step_generator(run.seed, step, index, run.device)
                torch.manual_seed(generator.initial_seed())  # dropout in adapters draws from the global RNG
                loss = micro_step_loss(run, task, batch, generator)
                _check_finite(run, loss, step + 1, batch)
                loss.backward()
                total += loss.item()
            if not stepped_in_backward:
                average_gradients(params, len(micro), run.num_processes)
                if args.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                run.optimizer.step()
            if run.lr_scheduler is not None:
                # the schedule spans max_train_steps × processes (sd-scripts' convention)
                for _ in range(run.num_processes):
                    run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            logs = task.after_step(run)
            step += 1
            if ema is not None:  # EMA: average the weights this step produced
                ema.update(step)
            progress.update(1)
            avg = tracker.step(step, epoch + 1, total / max(1, len(micro)), logs)
            progress.set_postfix(loss=f"{avg:.4f}")
            if policy.step_due(step, run.max_steps):
                _save_between_steps(run, task, policy, epoch + 1, step, "step")
            if _sample_due(args, step, None):
                _sample(run, task, step, None)
            if validator is not None and validator.step_due(step):
                tracker.validation("step", step, validator.loss())
        if step % per_epoch == 0:
            finished = step // per_epoch
            finish_latent_cache(run, task)
            if validator is not None and validator.epoch_due(finished):
                tracker.validation("epoch", finished, validator.loss())
            tracker.epoch_end(finished)
            if step < run.max_steps and policy.epoch_due(finished, run.num_epochs):
                _save_between_steps(run, task, policy, finished, step, "epoch")
            if _sample_due(args, step, finished):
                _sample(run, task, step, finished)
    progress.close()
    run.extra.pop("epoch_loader", None)  # ends persistent loading workers
    optimizer_eval_mode(run.optimizer)
    _save_point(run, task, policy, math.ceil(step / per_epoch), step, "final")
    tracker.close()
    run.accelerator.end_training()
    return run
