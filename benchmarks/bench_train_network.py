"""Benchmark of LoRA training on CPU: seconds per step against a bare forward+backward, time to the
first step, and peak memory, for an SD1.5-size and an SDXL-size model.

    python benchmarks/bench_train_network.py [--families sd1,sdxl] [--steps 6] [--mixed_precision no,bf16]
        [--first_use] [--profile] [--no_plain] [--no_interleaved] [--interleaved_steps N] [--fp8] [--only_train]

Settings (from the issue): 256 px, batch 1, LoRA dim 4 (alpha 1), cached latents, on CPU in float32
(`--mixed_precision no`, the default) and/or with `--mixed_precision bf16`,
seeded random full-size checkpoints (`tools/make_random_model.py --size full --precision fp16`,
generated once into the cache folder, shared with the model I/O benchmark) and a four-photo
DreamBooth folder. For each family, in fresh child processes measured from outside:

* train: `train_network.py` / `sdxl_train_network.py` as a user runs it. Step times come from the
  tqdm counter on stderr, time-stamped as it arrives; the time to the first step is from launch to
  the counter showing 1; peak RSS is the kernel's high-water mark of the training process (wait4),
  and the polled peak PSS of the whole process tree (DataLoader workers included) is shown beside
  it. CPU seconds per step of the training process are sampled from outside as well.
* bare: the same models held as the trainer holds them (frozen U-Net and text encoders in the
  file's fp16 with float32 compute, `library/models/frozen_weights.py`; with bf16, read in bf16 and held by
  the same module with bf16 compute under autocast; the VAE stays loaded,
  where the trainer frees it after caching, so the bare peak RSS is not the trainer's), the same LoRA
  (`networks.lora.create_network` + `apply_to` on the text encoder(s) and U-Net, as the trainer
  does by default), the same SDPA attention, then timed iterations of text-encoder forward +
  `unet(noisy, t, context).sample` + MSE + backward on 32×32 latents: the compute a training step
  cannot avoid. step / bare near 1 means the loop adds almost nothing. The bare child runs once
  before and once after the training, and its iterations are pooled: this machine's speed drifts
  by 10-20 % over minutes, and bracketing puts that drift on both sides of the ratio.
* interleaved: the training script's own `main()` in one process, with one bare iteration on the
  trainer's own models and LoRA after every finished step (train_children.py). Steps and bare
  iterations alternate within seconds, and each step is set against the mean of the two bare
  iterations around it, so the machine's drift, which moves the separate processes' ratio by
  several per cent, falls on both alike: the closest measure of what the loop adds. The median of
  these ratios comes with a 95 % interval; on a noisy machine `--interleaved_steps 30` narrows it.
* plain bare (float32 only): the same iterations on stock layers with every weight in float32, as
  a trainer that loads the model in float32 computes (twice the frozen weights' memory, no upcasts):
  a side-by-side stand-in, on this machine, for the established trainer's float32 compute. It runs
  between the two bare runs' halves (after the first bare run, before the training).

Targets (issue): step / bare <= 1.05; against the established trainer on this machine (SD1.5: 4.6
s/step, 53 s to the first step, 6.8 GiB peak RSS; SDXL: 9.1 s/step, 70 s, 19.9 GiB), step time no
worse, time to the first step <= 0.4x, peak RSS <= 0.6x.

With 2 cores, any other busy process stretches every time here: the load average before the run
and the share of the CPUs that other processes (and the hypervisor's steal) took during it are
printed, with a warning when the machine was not idle, and so is the cost of first-touching a
page of fresh memory, which on a virtual machine can vary tenfold and moves the time to the first
step. On a busy machine run with `--threads 1`:
with more OpenMP threads than free cores every parallel op waits for a descheduled thread (AdamW's
per-tensor step over the SD1.5 LoRA went from 0.04 s to 2.7 s that way), and the CPU seconds per
step, which other processes hardly change, give the step / bare ratio. `--profile` additionally runs a short
training under cProfile and writes where a step's time goes to CACHE_DIR/profile-train-FAMILY[-bf16].txt.

`--fp8` runs every training a second time with `--fp8_base` (frozen U-Net and text encoders held in
float8_e4m3fn, library/models/fp8_weights.py) and sets its s/step, peak RSS and loss beside the run
without it: same seed, so the same batches, noise and timesteps, and the loss (the trainer's moving
average at each step, from the tqdm line) differs only by the weights' rounding. A third run without
fp8 under `--seed 1` gives the yardstick: how far the same short run's loss moves by the seed alone
(other batches' order, noise and timesteps). `--only_train` skips
the bare, plain and interleaved runs (the rows that judge the loop's overhead).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_checkpoints import checkpoint_path, ensure_checkpoint  # noqa: E402,F401
from machine_load import OtherLoad  # noqa: E402
from train_children import RESOLUTION, training_args  # noqa: E402
from watched_child import (  # noqa: E402
    BUSY_SHARE, GIB, MIN_AVAILABLE, OutOfMemory, Watched, child_env, cpu_at, first_event, first_touch_us, loadavg,
    mem_available, step_losses, step_times,
)
FAMILIES = ("sd1", "sdxl")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")

# the established trainer on this machine, same settings (from the issue)
REFERENCE = {
    "sd1": {"step": 4.6, "first": 53.0, "rss": 6.8},
    "sdxl": {"step": 9.1, "first": 70.0, "rss": 19.9},
}
STEP_OVER_BARE = 1.05
FIRST_FACTOR = 0.4
RSS_FACTOR = 0.6
# float32 training holds twice the fp16 file (the weights) plus libraries and activations: a family
# is skipped when MemAvailable is below this estimate, and a child is killed when MemAvailable
# falls under MIN_AVAILABLE while it runs (other people's processes share this machine)
MEMORY_FACTOR = 2.0
MEMORY_EXTRA = 3 * GIB



# ---------------------------------------------------------------------------------------------
# inputs: the checkpoint and the photos


def ensure_photos(cache_dir: str) -> str:
    """A DreamBooth folder `10_subject` with four 256×256 photos and captions (one bucket, batch 1)."""
    root = os.path.join(cache_dir, f"train-photos-{RESOLUTION}")
    folder = os.path.join(root, "10_subject")
    if all(os.path.isfile(os.path.join(folder, f"{n}.png")) for n in PHOTOS):
        return root
    import numpy as np
    import skimage.data
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for name in PHOTOS:
        array = getattr(skimage.data, name)()
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        image = Image.fromarray(array[..., :3])
        side = min(image.size)
        image = image.crop((0, 0, side, side)).resize((RESOLUTION, RESOLUTION), Image.LANCZOS)
        image.save(os.path.join(folder, f"{name}.png"))
        with open(os.path.join(folder, f"{name}.txt"), "w", encoding="utf-8") as f:
            f.write(f"a photo of {name}")
    return root


# ---------------------------------------------------------------------------------------------
# the measurements


def measure_training(family: str, model: str, data: str, steps: int, threads: int, extra=(),
                     mixed_precision: str = "no") -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-train-") as out:
        cmd = [sys.executable, *training_args(family, model, data, out, steps, extra, mixed_precision)]
        watched = Watched(cmd, child_env(threads))
        result = watched.wait()
        if watched.killed_for_memory:
            raise OutOfMemory(f"[{family}] training stopped after {result['wall']:.0f} s with MemAvailable under "
                              f"{MIN_AVAILABLE / GIB:.0f} GiB; its peak RSS had reached {result['peak_rss'] / GIB:.2f} GiB")
        if result["returncode"] != 0:
            raise SystemExit(f"[{family}] training failed ({result['returncode']}):\n{watched.log_tail()}")
        if not os.path.isfile(os.path.join(out, "bench.safetensors")):
            raise SystemExit(f"[{family}] training wrote no bench.safetensors:\n{watched.log_tail()}")
    done = step_times(watched.events)
    if len(done) < steps:
        raise SystemExit(f"[{family}] saw {len(done)} of {steps} steps in the tqdm output:\n{watched.log_tail()}")
    gaps = [b - a for a, b in zip(done, done[1:])]
    cpu = [cpu_at(watched.cpu_samples, at) for at in done]
    cpu_gaps = [b - a for a, b in zip(cpu, cpu[1:])]
    loop_start = first_event(watched.events, "training network on")
    cache_done = first_event(watched.events, "latent cache:")
    return dict(result, first_step=done[0], step_seconds=statistics.median(gaps), step_gaps=gaps, cpu_gaps=cpu_gaps,
                loop_start=loop_start, cache_done=cache_done, losses=step_losses(watched.events),
                first_step_only=done[0] - loop_start if loop_start is not None else None)


def run_child(kind: str, family: str, threads: int, options: list) -> dict:
    """Run `--child KIND` of this script, watched like a training; its JSON result with the kernel's counts."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--family", family, *options]
    watched = Watched(cmd, child_env(threads))
    result = watched.wait()
    if watched.killed_for_memory:
        raise OutOfMemory(f"[{family}] {kind} run stopped with MemAvailable under {MIN_AVAILABLE / GIB:.0f} GiB; "
                          f"its peak RSS had reached {result['peak_rss'] / GIB:.2f} GiB")
    if result["returncode"] != 0:
        raise SystemExit(f"[{family}] {kind} run failed ({result['returncode']}):\n{watched.log_tail()}")
    return dict(result, **json.loads(watched.stdout.decode().strip().splitlines()[-1]))


def measure_bare(family: str, model: str, iters: int, threads: int, mixed_precision: str = "no",
                 plain: bool = False) -> dict:
    return run_child("bare", family, threads, ["--path", model, "--iters", str(iters), "--mixed_precision",
                                               mixed_precision] + (["--plain"] if plain else []))


def measure_interleaved(family: str, model: str, data: str, steps: int, threads: int,
                        mixed_precision: str = "no") -> dict:
    """The trainer's loop with a bare iteration after each step, in one process (train_children.py)."""
    return run_child("interleaved", family, threads, ["--path", model, "--data", data, "--steps", str(steps),
                                                      "--mixed_precision", mixed_precision])


def merge_bare(before: dict, after: dict) -> dict:
    """One bare result from the runs before and after the training: medians over all iterations."""
    merged = dict(after, peak_rss=max(before["peak_rss"], after["peak_rss"]),
                  load_seconds=min(before["load_seconds"], after["load_seconds"]),
                  bare_all=before["bare_all"] + after["bare_all"], bare_cpu=before["bare_cpu"] + after["bare_cpu"])
    merged["bare_seconds"] = statistics.median(merged["bare_all"])
    for part in ("te_forward", "unet_forward", "backward"):
        merged[part] = (before[part] + after[part]) / 2
    return merged


# ---------------------------------------------------------------------------------------------
# profiling one short training run


def measure_profile(family: str, model: str, data: str, steps: int, threads: int, report: str,
                    mixed_precision: str = "no") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "profile", "--family", family, "--path", model,
           "--data", data, "--steps", str(steps), "--report", report, "--mixed_precision", mixed_precision]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"[{family}] profile run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# report


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def family_label(family: str, mixed_precision: str) -> str:
    return {"sd1": "SD1.5", "sdxl": "SDXL"}[family] + ("" if mixed_precision == "no" else f" {mixed_precision}")


def plain_rows(family: str, train: dict, plain: dict) -> list:
    """The float32 step against the same compute on stock layers with float32 weights."""
    label = family_label(family, "no")
    return [
        [f"{label} plain bare (stock layers, float32 weights), s (median of {len(plain['bare_all'])})",
         f"{plain['bare_seconds']:.2f}", "-", "-", "-", "-"],
        [f"{label} step / plain bare, wall median / median", f"{train['step_seconds'] / plain['bare_seconds']:.3f}",
         "-", "-", "-", "-"],
        [f"{label} plain bare peak RSS (VAE loaded), GiB", f"{plain['peak_rss'] / GIB:.2f}", "-", "-", "-", "-"],
    ]


def family_rows(family: str, train: dict, bare: dict, mixed_precision: str = "no", judged: bool = True) -> list:
    """The training child's rows. With `judged` false (the interleaved run measured the step / bare
    target), the separate processes' step / bare ratios are shown without a verdict."""
    ref = REFERENCE[family]
    step, first, rss = train["step_seconds"], train["first_step"], train["peak_rss"] / GIB
    ratio = step / bare["bare_seconds"]
    # the least-disturbed sample of each, shown beside the medians
    ratio_min = min(train["step_gaps"]) / min(bare["bare_all"])
    # CPU seconds hardly change when other processes take turns on the cores (with 1 thread per child)
    cpu_ratio = statistics.median(train["cpu_gaps"]) / statistics.median(bare["bare_cpu"])
    label = family_label(family, mixed_precision)
    target = f"<= {STEP_OVER_BARE}" if judged else "-"
    return [
        [f"{label} s/step (median of {len(train['step_gaps'])})", f"{step:.2f}", f"{ref['step']:.2f}",
         f"{step / ref['step']:.2f}x", "<= 1.00x", verdict(step <= ref["step"])],
        [f"{label} bare TE fwd + U-Net fwd+bwd, s (median of {len(bare['bare_all'])})", f"{bare['bare_seconds']:.2f}",
         "-", "-", "-", "-"],
        [f"{label} step / bare, separate processes, wall median / median (min / min)", f"{ratio:.3f} ({ratio_min:.3f})", "-", "-",
         target, verdict(ratio <= STEP_OVER_BARE) if judged else "-"],
        [f"{label} step / bare, separate processes, CPU seconds, median", f"{cpu_ratio:.3f}", "-", "-", target,
         verdict(cpu_ratio <= STEP_OVER_BARE) if judged else "-"],
        [f"{label} launch to first finished step, s", f"{first:.1f}", f"{ref['first']:.0f}",
         f"{first / ref['first']:.2f}x", f"<= {FIRST_FACTOR}x", verdict(first <= FIRST_FACTOR * ref["first"])],
        [f"{label} peak RSS of the trainer, GiB", f"{rss:.2f}", f"{ref['rss']:.1f}", f"{rss / ref['rss']:.2f}x",
         f"<= {RSS_FACTOR}x", verdict(rss <= RSS_FACTOR * ref["rss"])],
        [f"{label} peak PSS of the process tree (polled), GiB", f"{train['tree_peak'] / GIB:.2f}", "-", "-", "-", "-"],
    ]


def median_interval(values: list, level: float = 0.95) -> tuple:
    """A distribution-free confidence interval of the median: the order statistics x(k), x(n+1-k)
    with the largest k for which Binomial(n, 1/2) puts at most (1 - level) / 2 below k."""
    ordered, n = sorted(values), len(values)
    tail, k = 0.0, 0
    while k < n // 2 and tail + math.comb(n, k) / 2 ** n <= (1 - level) / 2:
        tail += math.comb(n, k) / 2 ** n
        k += 1
    return (ordered[k - 1], ordered[n - k]) if k else (ordered[0], ordered[-1])


def bracketed_ratios(steps: list, bares: list) -> list:
    """Each step over the mean of the bare iterations just before and just after it, which takes a
    steady drift of the machine's speed out of the ratio. `steps[i]` ran between `bares[i]` and
    `bares[i + 1]`; `bares[0]` is the warm-up, so the first step is left out."""
    return [steps[i] / ((bares[i] + bares[i + 1]) / 2) for i in range(1, min(len(steps), len(bares) - 1))]


def interleaved_rows(family: str, mixed: dict, mixed_precision: str = "no") -> list:
    """Step / bare with steps and bare iterations alternating in one training process.

    The target is judged on the median of the bracketed ratios (each step against the two bare
    iterations around it, seconds apart), as a burst of load from elsewhere slows the step and its
    neighbours alike; a 95 % interval of that median shows how far the machine's noise leaves it
    uncertain. The median ratio of each step to the bare iteration that follows it, and the ratio
    of the two medians, are shown beside it."""
    label = family_label(family, mixed_precision)
    steps, bares = mixed["step_all"], mixed["bare_all"]
    bracketed = bracketed_ratios(steps, bares)
    if not bracketed:
        return []
    median = statistics.median(bracketed)
    low, high = median_interval(bracketed)
    following = statistics.median(s / b for s, b in zip(steps, bares[1:]))
    step, bare = statistics.median(steps), statistics.median(bares[1:])
    cpu = bracketed_ratios(mixed["step_cpu"], mixed["bare_cpu"])
    return [
        [f"{label} interleaved in one process: step / bare around it, median of {len(bracketed)} steps "
         "[95 % interval]", f"{median:.3f} [{low:.3f}-{high:.3f}]", "-", "-", f"<= {STEP_OVER_BARE}",
         verdict(median <= STEP_OVER_BARE)],
        [f"{label} interleaved: step / following bare, median of pairs (median / median)",
         f"{following:.3f} ({step:.2f} / {bare:.2f} s = {step / bare:.3f})", "-", "-", "-", "-"],
        [f"{label} interleaved: step / bare around it in CPU seconds, median", f"{statistics.median(cpu):.3f}",
         "-", "-", "-", "-"],
    ] + compute_rows(label, mixed)


def compute_rows(label: str, mixed: dict) -> list:
    """The loop's own work per step (the step's time outside its forward and backward) and the
    step's forward + backward against the bare iterations around it."""
    computes = mixed.get("step_compute")
    if not computes:
        return []
    steps = mixed["step_all"]
    own = [s - c for s, c in zip(steps[1:], computes[1:])]
    share = statistics.median(o / s for o, s in zip(own, steps[1:]))
    return [
        [f"{label} interleaved: the loop's own work per step (outside forward and backward), median s (share)",
         f"{statistics.median(own):.3f} ({100 * share:.1f} %)", "-", "-", "-", "-"],
        [f"{label} interleaved: the step's forward + backward / bare around it, median",
         f"{statistics.median(bracketed_ratios(computes, mixed['bare_all'])):.3f}", "-", "-", "-", "-"],
    ]


def first_use_rows(family: str, train: dict, mixed_precision: str = "no") -> list:
    """The run with --cache_latents_on_first_use: its steps in epoch 1 include encodes, so only the
    time to the first step and the peak RSS are compared."""
    ref = REFERENCE[family]
    first, rss = train["first_step"], train["peak_rss"] / GIB
    label = family_label(family, mixed_precision) + " with --cache_latents_on_first_use"
    return [
        [f"{label}: launch to first finished step, s", f"{first:.1f}", f"{ref['first']:.0f}",
         f"{first / ref['first']:.2f}x", f"<= {FIRST_FACTOR}x", verdict(first <= FIRST_FACTOR * ref["first"])],
        [f"{label}: peak RSS of the trainer, GiB", f"{rss:.2f}", f"{ref['rss']:.1f}", f"{rss / ref['rss']:.2f}x",
         f"<= {RSS_FACTOR}x", verdict(rss <= RSS_FACTOR * ref["rss"])],
    ]


RESEED = 1  # --fp8's yardstick run: the same training under another seed


def fp8_rows(family: str, train: dict, fp8: dict, mixed_precision: str = "no", reseeded: dict | None = None) -> list:
    """The run with --fp8_base against the same run without it (same seed: same batches and noise), and
    the run without it under another seed: how far a short run's loss moves by chance alone."""
    label = family_label(family, mixed_precision) + " --fp8_base"
    rss, rss_fp8 = train["peak_rss"] / GIB, fp8["peak_rss"] / GIB
    step, step_fp8 = train["step_seconds"], fp8["step_seconds"]
    loss, loss_fp8 = train["losses"][-1], fp8["losses"][-1]
    gap = max(abs(a - b) / abs(a) for a, b in zip(train["losses"], fp8["losses"]))
    return [
        [f"{label}: s/step (median of {len(fp8['step_gaps'])}) / without", f"{step_fp8:.2f} / {step:.2f}", "-",
         f"{step_fp8 / step:.2f}x", "-", "-"],
        [f"{label}: peak RSS of the trainer, GiB / without", f"{rss_fp8:.2f} / {rss:.2f}", "-",
         f"{rss_fp8 / rss:.2f}x", "-", "-"],
        [f"{label}: loss after {len(fp8['losses'])} steps (moving average) / without; largest step difference",
         f"{loss_fp8:.4f} / {loss:.4f}; {100 * gap:.2f} %", "-", f"{loss_fp8 / loss:.4f}x", "-", "-"],
    ] + ([] if reseeded is None else [
        [(f"{family_label(family, mixed_precision)}: loss after {len(reseeded['losses'])} steps with --seed "
          f"{RESEED} / --seed 0 (no fp8: the seed's own spread)"), f"{reseeded['losses'][-1]:.4f} / {loss:.4f}", "-",
         f"{reseeded['losses'][-1] / loss:.4f}x", "-", "-"],
    ])


def render(rows: list) -> str:
    head = ["measure", "sdtrain", "established trainer", "ratio", "target", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def details(family: str, train: dict, bare: dict, mixed_precision: str = "no") -> str:
    family = family if mixed_precision == "no" else f"{family} {mixed_precision}"
    parts = [f"[{family}] training: wall {train['wall']:.1f} s, CPU {train['cpu']:.1f} s; step gaps "
             + ", ".join(f"{g:.2f}" for g in train["step_gaps"]) + " s; CPU per step "
             + ", ".join(f"{g:.2f}" for g in train["cpu_gaps"]) + " s"]
    if train["cache_done"] is not None and train["loop_start"] is not None:
        parts.append(f"[{family}] to first step: launch→latents cached {train['cache_done']:.1f} s, "
                     f"→loop start {train['loop_start']:.1f} s, first step itself {train['first_step_only']:.1f} s")
    parts.append(f"[{family}] bare: load {bare['load_seconds']:.1f} s; per iteration TE fwd {bare['te_forward']:.2f} s, "
                 f"U-Net fwd {bare['unet_forward']:.2f} s, backward {bare['backward']:.2f} s; all "
                 + ", ".join(f"{s:.2f}" for s in bare["bare_all"]) + " s; CPU "
                 + ", ".join(f"{s:.2f}" for s in bare["bare_cpu"])
                 + f"; peak RSS {bare['peak_rss'] / GIB:.2f} GiB; {bare['threads']} threads")
    return "\n".join(parts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: sd1, sdxl (default both)")
    p.add_argument("--steps", type=int, default=6, help="training steps per run (the first is not in s/step)")
    p.add_argument("--iters", type=int, default=4, help="timed bare iterations (after one warm-up)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP threads of every child")
    p.add_argument("--cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "sdtrain-bench"),
                   help="where generated checkpoints and photos are kept between runs")
    p.add_argument("--skip_generate", action="store_true", help="skip a family whose checkpoint is not cached")
    p.add_argument("--force", action="store_true", help="run a family even when MemAvailable looks too small")
    p.add_argument("--mixed_precision", default="no",
                   help="comma-separated precisions to run: no (float32, the default), bf16 (--mixed_precision bf16)")
    p.add_argument("--first_use", action="store_true",
                   help="also time a run with --cache_latents_on_first_use (first step and peak RSS)")
    p.add_argument("--profile", action="store_true",
                   help="also profile a 3-step training; report in CACHE_DIR/profile-train-FAMILY[-bf16].txt")
    p.add_argument("--no_plain", action="store_true",
                   help="skip the float32 plain bare run (stock layers, float32 weights)")
    p.add_argument("--interleaved_steps", type=int, default=0,
                   help="training steps of the interleaved run (default: --steps); more steps narrow the "
                        "interval of its step / bare median")
    p.add_argument("--no_interleaved", action="store_true",
                   help="skip the run that alternates training steps and bare iterations in one process")
    p.add_argument("--fp8", action="store_true",
                   help="also run each training with --fp8_base and compare s/step, peak RSS and loss")
    p.add_argument("--only_train", action="store_true",
                   help="only the training runs (no bare, plain or interleaved runs): with --fp8, the fp8 rows alone")
    # internal: one measurement in a fresh process
    p.add_argument("--child", choices=("bare", "interleaved", "profile"), help=argparse.SUPPRESS)
    p.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--family", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        sys.path.insert(0, REPO)
        import train_children

        if args.child == "bare":
            result = train_children.child_bare(args.family, args.path, args.iters, args.mixed_precision, args.plain)
        elif args.child == "interleaved":
            result = train_children.child_interleaved(args.family, args.path, args.data, args.steps,
                                                      args.mixed_precision)
        else:
            result = train_children.child_profile(args.family, args.path, args.data, args.steps, args.report,
                                                  args.mixed_precision)
        print(json.dumps(result))
        return
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"--families: unknown {unknown}; choose from {', '.join(FAMILIES)}")
    precisions = [m.strip() for m in args.mixed_precision.split(",") if m.strip()]
    if not precisions or any(m not in ("no", "bf16") for m in precisions):
        raise SystemExit(f"--mixed_precision {args.mixed_precision}: choose from no, bf16 (comma-separated)")
    if args.steps < 3:
        raise SystemExit("--steps must be at least 3 (the first step is warm-up; s/step needs two gaps)")
    rows, notes, profiles = [], [], []
    if "bf16" in precisions:
        # asked in a child, so that this process stays without torch
        probe = ("import torch; from library.models.device_setup import cpu_has_fast_bf16; "
                 "print(cpu_has_fast_bf16(), torch.backends.cpu.get_cpu_capability())")
        fast, capability = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                                          check=True).stdout.split()
        if fast != "True":  # the trainer would run float32, and the bare bf16 loop take hours
            precisions.remove("bf16")
            notes.append(f"bf16 skipped: this CPU ({capability}) has no bf16 kernels, where --mixed_precision bf16 "
                         "trains in float32 (docs/training-runs.md)")
            print(notes[-1], flush=True)
            if not precisions:
                raise SystemExit(notes[-1])
    data = ensure_photos(args.cache_dir)
    load_before, touch_before = loadavg(), first_touch_us()
    others = OtherLoad()
    for family in families:
        model = ensure_checkpoint(args.cache_dir, family, args.skip_generate)
        if model is None:
            continue
        need = MEMORY_FACTOR * os.path.getsize(model) + MEMORY_EXTRA
        if mem_available() < need and not args.force:
            notes.append(f"[{family}] skipped: needs about {need / GIB:.1f} GiB, MemAvailable is "
                         f"{mem_available() / GIB:.1f} GiB (--force runs it anyway)")
            print(notes[-1], flush=True)
            continue
        for precision in precisions:
            tag = family if precision == "no" else f"{family} {precision}"
            try:
                if args.only_train:
                    print(f"[{tag}] training {args.steps} steps...", flush=True)
                    train = measure_training(family, model, data, args.steps, args.threads, mixed_precision=precision)
                    notes.append(f"[{tag}] training: step gaps " + ", ".join(f"{g:.2f}" for g in train["step_gaps"])
                                 + " s; losses " + ", ".join(f"{x:.4f}" for x in train["losses"]))
                    fp8 = None
                    if args.fp8:
                        print(f"[{tag}] training {args.steps} steps with --fp8_base...", flush=True)
                        fp8 = measure_training(family, model, data, args.steps, args.threads, ("--fp8_base",), precision)
                        notes.append(f"[{tag} --fp8_base] training: step gaps "
                                     + ", ".join(f"{g:.2f}" for g in fp8["step_gaps"]) + " s; losses "
                                     + ", ".join(f"{x:.4f}" for x in fp8["losses"]))
                        print(f"[{tag}] training {args.steps} steps with --seed {RESEED}...", flush=True)
                        reseeded = measure_training(family, model, data, args.steps, args.threads,
                                                    ("--seed", str(RESEED)), precision)
                        notes.append(f"[{tag} --seed {RESEED}] losses "
                                     + ", ".join(f"{x:.4f}" for x in reseeded["losses"]))
                        rows += fp8_rows(family, train, fp8, precision, reseeded)
                    else:
                        rows.append([f"{family_label(family, precision)} s/step / peak RSS GiB",
                                     f"{train['step_seconds']:.2f} / {train['peak_rss'] / GIB:.2f}", "-", "-", "-", "-"])
                    print("\n".join(notes[-3 if fp8 else -1:]), flush=True)
                    continue
                # bare runs before and after the training, so that a drift of the machine's speed over
                # those minutes falls on both sides of the step / bare ratio
                print(f"[{tag}] bare forward+backward, {args.iters} iterations...", flush=True)
                before = measure_bare(family, model, args.iters, args.threads, precision)
                plain = None
                if precision == "no" and not args.no_plain:
                    print(f"[{tag}] plain bare forward+backward (float32 weights), {args.iters} iterations...",
                          flush=True)
                    plain = measure_bare(family, model, args.iters, args.threads, precision, plain=True)
                print(f"[{tag}] training {args.steps} steps...", flush=True)
                train = measure_training(family, model, data, args.steps, args.threads, mixed_precision=precision)
                fp8 = reseeded = None
                if args.fp8:
                    print(f"[{tag}] training {args.steps} steps with --fp8_base...", flush=True)
                    fp8 = measure_training(family, model, data, args.steps, args.threads, ("--fp8_base",), precision)
                    print(f"[{tag}] training {args.steps} steps with --seed {RESEED}...", flush=True)
                    reseeded = measure_training(family, model, data, args.steps, args.threads,
                                                ("--seed", str(RESEED)), precision)
                print(f"[{tag}] bare forward+backward again, {args.iters} iterations...", flush=True)
                bare = merge_bare(before, measure_bare(family, model, args.iters, args.threads, precision))
                mixed = None
                if not args.no_interleaved:
                    mixed_steps = max(args.interleaved_steps, 3) if args.interleaved_steps else args.steps
                    print(f"[{tag}] training {mixed_steps} steps with a bare iteration after each, in one process...",
                          flush=True)
                    mixed = measure_interleaved(family, model, data, mixed_steps, args.threads, precision)
            except OutOfMemory as e:
                notes.append(str(e))
                print(notes[-1], flush=True)
                continue
            rows += family_rows(family, train, bare, precision, judged=mixed is None)
            notes.append(details(family, train, bare, precision))
            if fp8 is not None:
                rows += fp8_rows(family, train, fp8, precision, reseeded)
                notes[-1] += (f"\n[{tag}] --fp8_base: step gaps " + ", ".join(f"{g:.2f}" for g in fp8["step_gaps"])
                              + " s; losses " + ", ".join(f"{x:.4f}" for x in fp8["losses"]) + " (without: "
                              + ", ".join(f"{x:.4f}" for x in train["losses"]) + ")")
            if mixed is not None:
                rows += interleaved_rows(family, mixed, precision)
                notes[-1] += (f"\n[{tag}] interleaved in one process: steps "
                              + ", ".join(f"{x:.2f}" for x in mixed["step_all"]) + " s, bare iterations "
                              + ", ".join(f"{x:.2f}" for x in mixed["bare_all"]) + " s")
            if plain is not None:
                rows += plain_rows(family, train, plain)
                notes[-1] += (f"\n[{tag}] plain bare: load {plain['load_seconds']:.1f} s; all "
                              + ", ".join(f"{x:.2f}" for x in plain["bare_all"]) + " s; CPU "
                              + ", ".join(f"{x:.2f}" for x in plain["bare_cpu"]))
            print(notes[-1], flush=True)
            if args.first_use:
                print(f"[{tag}] training {args.steps} steps with --cache_latents_on_first_use...", flush=True)
                lazy = measure_training(family, model, data, args.steps, args.threads, ("--cache_latents_on_first_use",),
                                        precision)
                rows += first_use_rows(family, lazy, precision)
                notes.append(f"[{tag}] --cache_latents_on_first_use: first step at {lazy['first_step']:.1f} s "
                             f"(loop start {lazy['loop_start']:.1f} s); step gaps "
                             + ", ".join(f"{g:.2f}" for g in lazy["step_gaps"]) + " s (epoch 1: they include encodes)")
                print(notes[-1], flush=True)
        for precision in precisions if args.profile else ():
            tag = family if precision == "no" else f"{family} {precision}"
            report = os.path.join(args.cache_dir, f"profile-train-{tag.replace(' ', '-')}.txt")
            print(f"[{tag}] profiling a 3-step run -> {report}", flush=True)
            result = measure_profile(family, model, data, 3, args.threads, report, precision)
            profiles.append((tag, result["buckets"]))
    other_share = others.share()
    touch_after = first_touch_us()
    print()
    print(f"LoRA training benchmark, {datetime.date.today().isoformat()}, {os.cpu_count()} cores, "
          f"{args.threads} threads per child, Python {platform.python_version()}; {RESOLUTION} px, batch 1, dim 4, "
          f"cached latents, {' and '.join('float32' if m == 'no' else m for m in precisions)}; load average {load_before:.2f} before; {OtherLoad.describe(other_share)}; "
          f"first touch of a fresh page {touch_before:.2f} us before, {touch_after:.2f} us after")
    # the load average before the run still holds whatever ran just before it (often our own
    # work); the share measured over the run says whether anything else competed with it
    busy = sum(other_share) > BUSY_SHARE if other_share is not None else load_before > 0.5
    if busy:
        print(f"WARNING: the machine was busy (load average {load_before:.2f} before the run; "
              f"{OtherLoad.describe(other_share)}): absolute times are inflated; the step/bare ratio, measured side by "
              f"side, is the more reliable number")
    if args.threads < (os.cpu_count() or 1):
        print(f"NOTE: {args.threads} thread(s) per child on {os.cpu_count()} cores: s/step and the time to the "
              "first step are not comparable with the established trainer's figures; the ratios are")
    print(render(rows))
    for note in notes:
        print(note)
    for family, buckets in profiles:
        print(f"\n[{family}] cProfile, 3 steps (cumulative seconds; profiling inflates Python-heavy parts):")
        for label, calls, cumulative in buckets:
            print(f"  {label:45s} {cumulative:8.2f} s  ({calls} calls)")


if __name__ == "__main__":
    main()
