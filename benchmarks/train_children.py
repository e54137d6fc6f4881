"""What the LoRA training benchmark (`bench_train_network.py`) runs inside its child processes.

* `child_bare`: the models loaded and held as the trainer holds them, the same LoRA, then timed
  bare iterations (text-encoder forward + U-Net forward + MSE + backward on fixed inputs).
* `child_interleaved`: the real training script's `main()` in this process, with one bare
  iteration on the trainer's own models and LoRA run after every finished step. Steps and bare
  iterations alternate within seconds, so a drift of the machine's speed falls on both alike.
* `child_profile`: a short training under cProfile, summed into buckets.

Each returns a dict that the parent reads as the last line of the child's stdout (JSON).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

RESOLUTION = 256


def training_args(family: str, model: str, data: str, out: str, steps: int, extra=(), mixed_precision="no") -> list:
    """The script and flags of every training the benchmark runs (the issue's settings)."""
    script = "sdxl_train_network.py" if family == "sdxl" else "train_network.py"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [
        os.path.join(repo, script), "--pretrained_model_name_or_path", model, "--train_data_dir", data,
        "--output_dir", out, "--output_name", "bench", "--resolution", str(RESOLUTION), "--train_batch_size", "1",
        "--caption_extension", ".txt", "--network_module", "networks.lora", "--network_dim", "4",
        "--network_alpha", "1", "--learning_rate", "1e-4", "--seed", "0", "--cache_latents",
        "--max_train_steps", str(steps), "--mixed_precision", mixed_precision, *extra,
    ]


def _run_script_main(args: list):
    """Import a training script from its path and call its `main` with the flags in `args[1:]`."""
    script = args[0]
    sys.argv = args
    sys.path.insert(0, os.path.dirname(script))
    module = __import__(os.path.splitext(os.path.basename(script))[0])
    return module.main, args[1:]


class BareIteration:
    """One bare iteration on given models: the compute a training step cannot avoid.

    Fixed inputs (a seeded 32×32 latent, one caption, t = 500), the same SDPA attention and
    precision as the trainer; afterwards the trainable tensors' gradients are dropped, so that a
    training step that follows starts as it would have without it."""

    def __init__(self, family, unet, conditioner, clip_skip, trainable: list, bf16: bool):
        import torch

        self.family, self.unet, self.conditioner, self.clip_skip = family, unet, conditioner, clip_skip
        self.trainable, self.bf16 = trainable, bf16
        self.ids = conditioner.tokenize(["a photo of astronaut"])
        generator = torch.Generator().manual_seed(0)
        size = RESOLUTION // 8
        latents = torch.randn(1, 4, size, size, generator=generator)
        self.noise = torch.randn(latents.shape, generator=generator)
        self.noisy = latents * 0.7 + self.noise * 0.7
        self.timesteps = torch.tensor([500])
        self.time_ids = torch.tensor([[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]], dtype=torch.float32)

    @classmethod
    def of_run(cls, run) -> "BareIteration":
        """On a training run's own models, LoRA and precision."""
        import torch

        trainable = [p for group in run.optimizer.param_groups for p in group["params"]]
        return cls(run.family, run.models.unet, run.conditioner, run.args.clip_skip, trainable,
                   run.precision.weight_dtype == torch.bfloat16)

    def __call__(self) -> dict:
        """Times of one iteration: text encoder, U-Net forward, backward, all (wall) and CPU seconds."""
        import torch

        c0 = time.process_time()
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            cond = self.conditioner.encode_tokens(self.ids, self.clip_skip)
            t1 = time.perf_counter()
            kwargs = {}
            if self.family.is_sdxl:
                kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": self.time_ids}
            pred = self.unet(self.noisy.to(self.unet.dtype), self.timesteps, cond.context, **kwargs).sample
        loss = torch.nn.functional.mse_loss(pred.float(), self.noise)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        for p in self.trainable:
            p.grad = None
        return {"te": t1 - t0, "unet": t2 - t1, "backward": t3 - t2, "all": t3 - t0, "cpu": time.process_time() - c0}


def child_bare(family: str, path: str, iters: int, mixed_precision: str = "no", plain: bool = False) -> dict:
    """Timed bare iterations with the trainer's LoRA, outside the trainer; with `plain`, on stock
    layers with float32 weights instead of the trainer's frozen layers."""
    import types

    import torch

    import networks.lora
    from library.models.device_setup import set_attention
    from library.models.frozen_weights import hold_in_half
    from library.models.loading import load_models
    from library.text.encoding import TextConditioner, training_clip_skip
    from library.text.tokenizer import load_tokenizers

    start = time.perf_counter()
    bf16 = mixed_precision == "bf16"
    if plain:  # every weight a float32 copy, torch's own layers
        models = load_models(path, sdxl=family == "sdxl", dtype=torch.float32)
    elif bf16:  # as the trainer holds them with --mixed_precision bf16: frozen weights in bf16, autocast
        models = load_models(path, sdxl=family == "sdxl", dtype=torch.bfloat16)
    else:  # as the trainer holds them in a float32 run: frozen U-Net and text encoders in the file's dtype
        frozen = {part: None for part in ("unet", "text_encoder", "text_encoder_2")}
        models = load_models(path, sdxl=family == "sdxl", dtype=torch.float32, part_dtypes=frozen)
    for module in [models.unet, models.vae, *models.text_encoders]:
        module.requires_grad_(False)
        module.eval()
    for module in [] if plain else [models.unet, *models.text_encoders]:  # the frozen layers, as in the trainer
        hold_in_half(module, torch.bfloat16 if bf16 else torch.float32)
    set_attention(models.unet, types.SimpleNamespace(), torch.device("cpu"))
    encoders = models.text_encoders if len(models.text_encoders) > 1 else models.text_encoders[0]
    network = networks.lora.create_network(1.0, 4, 1, models.vae, encoders, models.unet)
    network.apply_to(encoders, models.unet, True, True)
    network.train()
    conditioner = TextConditioner(models.family, load_tokenizers(models.family, path), models.text_encoders)
    clip_skip, _ = training_clip_skip(models.family, None)
    iteration = BareIteration(models.family, models.unet, conditioner, clip_skip, list(network.parameters()), bf16)
    load_seconds = time.perf_counter() - start

    rows = [iteration() for _ in range(iters + 1)][1:]  # the first warms up allocators and kernels
    return {"load_seconds": load_seconds, "te_forward": statistics.median(r["te"] for r in rows),
            "unet_forward": statistics.median(r["unet"] for r in rows),
            "backward": statistics.median(r["backward"] for r in rows),
            "bare_seconds": statistics.median(r["all"] for r in rows), "bare_all": [r["all"] for r in rows],
            "bare_cpu": [r["cpu"] for r in rows], "threads": torch.get_num_threads()}


def child_interleaved(family: str, model: str, data: str, steps: int, mixed_precision: str = "no") -> dict:
    """The training script's own loop with a bare iteration after every step, in one process.

    The hook is the loop's per-step call to `TrainLogger.step`: a step's time runs from the end of
    the previous bare iteration to the end of that call, so it holds everything the loop does for
    the step (loading the batch, forward, backward, optimizer, logging). The step's forward
    (`micro_step_loss`) and backward are timed as well, so that the loop's own work (the rest) is
    known apart from the compute. The first step warms up and is not counted; every counted step
    has a bare iteration on each side."""
    import torch

    from library.training import train_logging, trainer

    logged, loss_of, backward = train_logging.TrainLogger.step, trainer.micro_step_loss, torch.Tensor.backward
    marks = {"after_bare": None, "cpu_after_bare": None, "compute": 0.0, "in_bare": False}
    step_wall, step_cpu, step_compute, bare = [], [], [], []
    iteration = []

    def timed(function):
        def run(*args, **kwargs):
            if marks["in_bare"]:
                return function(*args, **kwargs)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                marks["compute"] += time.perf_counter() - start
        return run

    def step_then_bare(self, step, epoch, loss, extra):
        average = logged(self, step, epoch, loss, extra)
        now, cpu = time.perf_counter(), time.process_time()
        if marks["after_bare"] is not None:
            step_wall.append(now - marks["after_bare"])
            step_cpu.append(cpu - marks["cpu_after_bare"])
            step_compute.append(marks["compute"])
        if not iteration:
            iteration.append(BareIteration.of_run(self.run))
        marks["in_bare"] = True
        bare.append(iteration[0]())
        marks["in_bare"], marks["compute"] = False, 0.0
        marks["after_bare"], marks["cpu_after_bare"] = time.perf_counter(), time.process_time()
        return average

    train_logging.TrainLogger.step = step_then_bare
    trainer.micro_step_loss, torch.Tensor.backward = timed(loss_of), timed(backward)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-interleaved-") as out:
            main, argv = _run_script_main(training_args(family, model, data, out, steps,
                                                        mixed_precision=mixed_precision))
            main(argv)
    finally:
        train_logging.TrainLogger.step, trainer.micro_step_loss, torch.Tensor.backward = logged, loss_of, backward
    # step_all[i] ran between bare_all[i] and bare_all[i + 1]; bare_all[0] is the warm-up
    return {"step_all": step_wall, "step_cpu": step_cpu, "step_compute": step_compute,
            "bare_all": [b["all"] for b in bare], "bare_cpu": [b["cpu"] for b in bare]}


PROFILE_BUCKETS = (
    # (label, function name as pstats shows it, file suffix); cumulative times
    ("whole run (train)", "train", "library/training/trainer.py"),
    ("  set-up: prepare_run", "prepare_run", "library/training/trainer.py"),
    ("    load_models", "load_models", "library/models/loading.py"),
    ("    latent caching (attach_caches)", "attach_caches", "library/caching/training_caches.py"),
    ("    task.setup (LoRA create/apply)", "setup", "library/training/task_network.py"),
    ("  steps: micro_step_loss", "micro_step_loss", "library/training/trainer.py"),
    ("    text encoder (_conditioning)", "_conditioning", "library/training/trainer.py"),
    ("    U-Net forward", "forward", "diffusers/models/unets/unet_2d_condition.py"),
    ("    loss (compute_loss)", "compute_loss", "library/training/losses.py"),
    ("  steps: backward", "backward", "torch/_tensor.py"),
    ("  steps: average_gradients", "average_gradients", "library/training/grad_sync.py"),
    ("  steps: clip_grad_norm_", "clip_grad_norm_", "torch/nn/utils/clip_grad.py"),
    ("  steps: optimizer step (Adam.step)", "step", "torch/optim/adam.py"),
    ("  steps: lr scheduler step", "step", "torch/optim/lr_scheduler.py"),
    ("  steps: zero_grad", "zero_grad", "torch/optim/optimizer.py"),
    ("  steps: batch loading (load_batch)", "load_batch", "library/data/train_dataset.py"),
    ("  steps: DataLoader (__next__)", "__next__", "torch/utils/data/dataloader.py"),
    ("  steps: logging (TrainLogger.step)", "step", "library/training/train_logging.py"),
    ("  steps: LoRA module forwards (python)", "forward", "networks/lora_layers.py"),
    ("  final save (_save_point)", "_save_point", "library/training/trainer.py"),
)


def child_profile(family: str, model: str, data: str, steps: int, report: str, mixed_precision: str = "no") -> dict:
    """A short training under cProfile; the full report goes to `report`, the buckets are returned."""
    import cProfile
    import pstats

    with tempfile.TemporaryDirectory(prefix="bench-profile-") as out:
        main, argv = _run_script_main(training_args(family, model, data, out, steps, mixed_precision=mixed_precision))
        profiler = cProfile.Profile()
        profiler.runcall(main, argv)
    stats = pstats.Stats(profiler)
    buckets = []
    for label, name, suffix in PROFILE_BUCKETS:
        calls, cumulative = 0, 0.0
        for (file, _, function), (_, ncalls, _, cum, _) in stats.stats.items():
            if function == name and file.replace(os.sep, "/").endswith(suffix):
                calls += ncalls
                cumulative += cum
        buckets.append((label, calls, cumulative))
    with open(report, "w", encoding="utf-8") as f:
        f.write(f"cProfile of {family} LoRA training, --mixed_precision {mixed_precision}, {steps} steps "
                "(profiling inflates Python-heavy parts)\n\n")
        for label, calls, cumulative in buckets:
            f.write(f"{label:45s} {cumulative:9.2f} s  ({calls} calls)\n")
        f.write("\n")
        for key in ("cumulative", "tottime"):
            f.write(f"--- sorted by {key} ---\n")
            pstats.Stats(profiler, stream=f).sort_stats(key).print_stats(40)
    return {"buckets": buckets}
