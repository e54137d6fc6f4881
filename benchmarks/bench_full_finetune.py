"""Benchmark of a full fine-tune step: peak RSS and step time of an SD1.5-size U-Net on the CPU.

    python benchmarks/bench_full_finetune.py [--steps 4] [--resolution 256] [--cache_dir DIR] [--only NAME,...]
        [--model PATH]

Runs `fine_tune.py`'s training (FullModelTask("fine_tune"), U-Net only, batch 1, cached latents,
float32) on a seeded random full-size SD1.5 checkpoint (made once with tools/make_random_model.py
and shared with bench_model_io.py) and four photos from scikit-image, with and without
`--gradient_checkpointing`, for AdamW, AdamW8bit, Adafactor (fixed lr) and Adafactor with
`--fused_backward_pass`. Each configuration runs in a fresh child process of this script, so its
RSS holds only that run. Reported per row:

* step time: median wall (and CPU) seconds of the steps after the first (which allocates the
  optimizer state), and the part of it spent in `optimizer.step()`;
* peak RSS: the process high-water mark over the training steps only (reset just before the first
  step), and over the whole run (model loading and latent caching included).

Saving is switched off in the children (it is not what is measured). A configuration whose
estimated memory exceeds what the machine has available is skipped with a note, not attempted:
an out-of-memory kill would hit other work on the machine too. AdamW8bit needs bitsandbytes on a
CUDA device; elsewhere the optimizer module falls back to AdamW, so the row is only run with
`--run_fallbacks`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_checkpoints import checkpoint_path  # noqa: E402
from watched_child import mem_available  # noqa: E402
GIB = 1024**3
SD15_UNET_PARAMS = 859_520_964  # trained tensors of a full fine-tune (U-Net only)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")

_ADAFACTOR = ["--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
              "warmup_init=False", "--max_grad_norm", "0"]
# name -> (--optimizer_type and --optimizer_args, optimizer state bytes per parameter)
OPTIMIZERS = {
    "AdamW": (["--optimizer_type", "AdamW"], 8),
    "AdamW8bit": (["--optimizer_type", "AdamW8bit"], 2),
    "Adafactor": (_ADAFACTOR, 0),
    "Adafactor+fused": (_ADAFACTOR + ["--fused_backward_pass"], 0),  # no full set of gradients
}


# ---------------------------------------------------------------------------------------------
# memory probes (Linux /proc)


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# the child: one training run


def child(options: dict) -> dict:
    """Train `options["steps"] + 1` steps; returns the measurements as a dict."""
    sys.path.insert(0, REPO)
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    from library.training.script_parsers import fine_tune_parser
    from library.training.task_full import FullModelTask
    from library.training.train_args import parse_args
    from library.training.trainer import train

    args = parse_args(fine_tune_parser(description=""), options["argv"])
    task = FullModelTask("fine_tune")
    marks = {"step_ends": [], "cpu_ends": [], "reset": None, "rss_start": None, "peak_load": None, "optimizer": []}
    before, after = task.before_step, task.after_step

    def timed_optimizer(optimizer):
        real = optimizer.step

        def step(*args, **kwargs):
            start = time.perf_counter()
            result = real(*args, **kwargs)
            marks["optimizer"].append(time.perf_counter() - start)
            return result

        step._wrapped_by_lr_sched = True  # the scheduler's own wrapper is inside `real`
        optimizer.step = step

    def before_step(run, batch):
        if marks["reset"] is None:  # the model is loaded and the latents cached: training starts
            marks["rss_start"] = _status_kib("VmRSS") * 1024
            marks["peak_load"] = _status_kib("VmHWM") * 1024
            marks["reset"] = _reset_high_water_mark()
            marks["step_ends"].append(time.perf_counter())
            marks["cpu_ends"].append(time.process_time())
            timed_optimizer(run.optimizer)
        return before(run, batch)

    def after_step(run):
        logs = after(run)
        marks["step_ends"].append(time.perf_counter())
        marks["cpu_ends"].append(time.process_time())
        return logs

    task.before_step, task.after_step = before_step, after_step
    task.save = lambda *a, **k: None  # saving is not measured
    train(args, task)
    walls = [b - a for a, b in zip(marks["step_ends"], marks["step_ends"][1:])]
    cpus = [b - a for a, b in zip(marks["cpu_ends"], marks["cpu_ends"][1:])]
    peak_end = _status_kib("VmHWM") * 1024
    return {
        "first_step_s": walls[0], "step_s": statistics.median(walls[1:]), "step_cpu_s": statistics.median(cpus[1:]),
        # --fused_backward_pass steps inside the backward pass: the loop never calls step()
        "optimizer_s": statistics.median(marks["optimizer"][1:]) if len(marks["optimizer"]) > 1 else None,
        "rss_start": marks["rss_start"], "peak_train": peak_end if marks["reset"] else None,
        "peak_run": max(peak_end, marks["peak_load"]), "optimizer": getattr(task.run, "optimizer_name", ""),
    }


# ---------------------------------------------------------------------------------------------
# the parent


def ensure_model(cache_dir: str) -> str:
    path = checkpoint_path(cache_dir, "sd1")
    if not os.path.isfile(path):
        os.makedirs(cache_dir, exist_ok=True)
        print(f"generating {path} (once)...", flush=True)
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_random_model.py"), "--family", "sd1",
                        "--size", "full", "--precision", "fp16", path], cwd=REPO, check=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return path


def ensure_photos(cache_dir: str, size: int) -> str:
    """Four photos at `size`×`size` and their fine-tuning metadata."""
    folder = os.path.join(cache_dir, f"full-finetune-photos-{size}")
    meta = os.path.join(folder, "meta.json")
    if os.path.isfile(meta):
        return folder
    import numpy as np
    import skimage.data
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    metadata = {}
    for name in PHOTOS:
        array = getattr(skimage.data, name)()
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        Image.fromarray(np.ascontiguousarray(array[..., :3])).resize((size, size)).save(os.path.join(folder, name + ".png"))
        metadata[name] = {"caption": f"a photo of {name}"}
    with open(meta, "w", encoding="utf-8") as f:
        json.dump(metadata, f)
    return folder


def estimated_bytes(optimizer: str) -> int:
    """Weights + gradients + optimizer state of the U-Net, plus ~2.5 GiB for the rest."""
    gradient = 0 if "--fused_backward_pass" in OPTIMIZERS[optimizer][0] else 4
    per_param = 4 + gradient + OPTIMIZERS[optimizer][1]
    return SD15_UNET_PARAMS * per_param + int(2.5 * GIB)


def run_child(options: dict, threads) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(options)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"child failed ({proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "sdtrain-bench"))
    p.add_argument("--steps", type=int, default=4, help="measured steps (one more runs first)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--only", default=None, help="comma-separated optimizer names to run (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the children (default: torch's choice)")
    p.add_argument("--model", default=None, help="another checkpoint (e.g. a tiny one to try the harness)")
    p.add_argument("--run_fallbacks", action="store_true", help="also run AdamW8bit where it falls back to AdamW")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    model = args.model or ensure_model(args.cache_dir)
    photos = ensure_photos(args.cache_dir, args.resolution)
    names = args.only.split(",") if args.only else list(OPTIMIZERS)
    bnb_usable = _bitsandbytes_usable()
    rows = []
    for name in names:
        for checkpointing in (False, True):
            label = f"{name}{' + grad. checkpointing' if checkpointing else ''}"
            if name == "AdamW8bit" and not bnb_usable and not args.run_fallbacks:
                rows.append((label, None, "not run: needs bitsandbytes + CUDA (here it falls back to AdamW, "
                                          "same as the AdamW row)"))
                continue
            need, have = estimated_bytes(name), mem_available()
            if need > have:
                rows.append((label, None, f"skipped: needs about {need / GIB:.1f} GiB, {have / GIB:.1f} GiB available"))
                continue
            with tempfile.TemporaryDirectory() as out:
                argv_child = [
                    "--pretrained_model_name_or_path", model, "--in_json", os.path.join(photos, "meta.json"),
                    "--train_data_dir", photos, "--output_dir", out, "--resolution", str(args.resolution),
                    "--train_batch_size", "1", "--cache_latents", "--max_train_steps", str(args.steps + 1),
                    "--learning_rate", "1e-6", "--seed", "0", "--max_data_loader_n_workers", "0",
                    *OPTIMIZERS[name][0], *(["--gradient_checkpointing"] if checkpointing else []),
                ]
                print(f"running {label}...", flush=True)
                start = time.perf_counter()
                try:
                    result = run_child({"argv": argv_child}, args.threads)
                except RuntimeError as e:
                    rows.append((label, None, f"failed: {str(e).splitlines()[-1]}"))
                    continue
                result["total_s"] = time.perf_counter() - start
            rows.append((label, result, ""))
    print_table(rows, args)
    return 0


def _bitsandbytes_usable() -> bool:
    code = "import bitsandbytes, torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def print_table(rows, args) -> None:
    print()
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"SD1.5-size full fine-tune (U-Net {SD15_UNET_PARAMS / 1e6:.0f} M params trained, float32), "
          f"{args.resolution}x{args.resolution} px, batch 1, cached latents; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {args.threads or 'default'} torch threads, load average {load} at the end; "
          f"{time.strftime('%Y-%m-%d')}")
    print()
    print("| configuration | step s (median) | of which optimizer s | step CPU s | first step s | RSS at start GiB "
          "| peak RSS in training GiB | peak RSS whole run GiB | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, r, note in rows:
        if r is None:
            print(f"| {label} | - | - | - | - | - | - | - | {note} |")
            continue
        peak_train = f"{r['peak_train'] / GIB:.2f}" if r["peak_train"] else "n/a"
        optimizer_s = "in backward" if r["optimizer_s"] is None else f"{r['optimizer_s']:.2f}"
        print(f"| {label} | {r['step_s']:.2f} | {optimizer_s} | {r['step_cpu_s']:.2f} | {r['first_step_s']:.2f} | "
              f"{r['rss_start'] / GIB:.2f} | {peak_train} | {r['peak_run'] / GIB:.2f} | {r['optimizer']} {note}|")


if __name__ == "__main__":
    sys.exit(main())
