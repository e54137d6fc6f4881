"""Benchmark of ControlNet-LLLite training on CPU against LoRA training of the same SDXL-size U-Net.

    flock /tmp/sdtrain-heavy.lock python benchmarks/bench_lllite.py [--steps 6] [--rounds 2]
        [--mixed_precision no,bf16] [--threads 2]

Settings: the seeded random full-size SDXL checkpoint the LoRA benchmark uses
(`tools/make_random_model.py --size full --precision fp16`, generated once into the cache folder),
its four 256×256 photos, batch 1, cached latents and text-encoder outputs, in fresh child processes
measured from outside (`Watched` of watched_child.py: tqdm step times time-stamped as they
arrive, the kernel's peak RSS of the trainer):

* LLLite: `sdxl_train_control_net_lllite.py --cond_emb_dim 32 --network_dim 64` (sd-scripts' canny
  settings: 136 modules, 23 M parameters) with canny edge maps of the photos (tools/canny.py);
* LoRA: `sdxl_train_network.py --network_module networks.lora --network_dim 4 --network_train_unet_only`
  (the U-Net alone, like LLLite).

Runs alternate (LoRA, LLLite, LoRA, LLLite ... for `--rounds`), and the ratio is taken per round, so
a drift of this machine's speed falls on both alike. s/step is the median gap between finished steps
(the first step is warm-up). The share of the CPUs other processes took is printed with the results.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_checkpoints import DEFAULT_CACHE, ensure_checkpoint  # noqa: E402
from bench_train_network import ensure_photos  # noqa: E402
from machine_load import OtherLoad  # noqa: E402
from train_children import RESOLUTION, training_args  # noqa: E402
from watched_child import GIB, MIN_AVAILABLE, OutOfMemory, Watched, child_env, mem_available, step_times  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDED = 14 * GIB  # an SDXL float32 run holds about 10 GiB; leave room for the rest of the machine


def ensure_hints(photos: str) -> str:
    """Canny edge maps of the photos, in a folder beside them."""
    images = os.path.join(photos, "10_subject")
    hints = os.path.join(os.path.dirname(photos), f"train-hints-{RESOLUTION}")
    if not os.path.isdir(hints) or len(os.listdir(hints)) < len([f for f in os.listdir(images) if f.endswith(".png")]):
        sys.path.insert(0, REPO)
        from tools import canny

        canny.main(["--input", images, "--output", hints])
    return hints


def lllite_args(model: str, photos: str, hints: str, out: str, steps: int, mixed_precision: str) -> list:
    return [
        os.path.join(REPO, "sdxl_train_control_net_lllite.py"), "--pretrained_model_name_or_path", model,
        "--train_data_dir", os.path.join(photos, "10_subject"), "--conditioning_data_dir", hints,
        "--output_dir", out, "--output_name", "bench", "--resolution", str(RESOLUTION), "--train_batch_size", "1",
        "--caption_extension", ".txt", "--cond_emb_dim", "32", "--network_dim", "64", "--learning_rate", "1e-4",
        "--seed", "0", "--cache_latents", "--cache_text_encoder_outputs", "--max_train_steps", str(steps),
        "--mixed_precision", mixed_precision,
    ]


def measure(kind: str, cmd_args: list, steps: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as out:
        cmd = [sys.executable] + [out if a == "{out}" else a for a in cmd_args]
        watched = Watched(cmd, child_env(threads))
        result = watched.wait()
        if watched.killed_for_memory:
            raise OutOfMemory(f"[{kind}] stopped with MemAvailable under {MIN_AVAILABLE / GIB:.0f} GiB")
        if result["returncode"] != 0 or not os.path.isfile(os.path.join(out, "bench.safetensors")):
            raise SystemExit(f"[{kind}] training failed ({result['returncode']}):\n{watched.log_tail()}")
    done = step_times(watched.events)
    if len(done) < steps:
        raise SystemExit(f"[{kind}] saw {len(done)} of {steps} steps:\n{watched.log_tail()}")
    gaps = [b - a for a, b in zip(done, done[1:])]
    return dict(result, step_seconds=statistics.median(gaps), first_step=done[0])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="training steps per run (the first is warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="LoRA/LLLite pairs, alternating")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP threads of every child")
    p.add_argument("--mixed_precision", default="no", help="comma-separated: no (float32), bf16")
    p.add_argument("--cache_dir", default=DEFAULT_CACHE, help="generated checkpoint and photos, kept between runs")
    args = p.parse_args(argv)
    if args.steps < 3:
        raise SystemExit("--steps must be at least 3")
    if mem_available() < NEEDED:
        raise SystemExit(f"needs about {NEEDED / GIB:.0f} GiB free; MemAvailable is {mem_available() / GIB:.1f} GiB")
    model = ensure_checkpoint(args.cache_dir, "sdxl", False)
    photos = ensure_photos(args.cache_dir)
    hints = ensure_hints(photos)
    others = OtherLoad()
    rows = []
    for precision in [m.strip() for m in args.mixed_precision.split(",") if m.strip()]:
        runs = {"lora": [], "lllite": []}
        for r in range(args.rounds):
            for kind in ("lora", "lllite"):
                print(f"[{precision}] round {r + 1}: {kind}, {args.steps} steps...", flush=True)
                if kind == "lora":
                    cmd = training_args("sdxl", model, photos, "{out}", args.steps,
                                        ["--network_train_unet_only", "--cache_text_encoder_outputs"], precision)
                else:
                    cmd = lllite_args(model, photos, hints, "{out}", args.steps, precision)
                result = measure(kind, cmd, args.steps, args.threads)
                print(f"    {result['step_seconds']:.2f} s/step, peak RSS {result['peak_rss'] / GIB:.2f} GiB", flush=True)
                runs[kind].append(result)
        ratios = [b["step_seconds"] / a["step_seconds"] for a, b in zip(runs["lora"], runs["lllite"])]
        label = "float32" if precision == "no" else precision
        lora_s = statistics.median(r["step_seconds"] for r in runs["lora"])
        lllite_s = statistics.median(r["step_seconds"] for r in runs["lllite"])
        rows.append(f"| SDXL {RESOLUTION} px, {label} | {lora_s:.2f} | {lllite_s:.2f} | "
                    f"{statistics.median(ratios):.2f}x ({', '.join(f'{x:.2f}' for x in ratios)}) | "
                    f"{max(r['peak_rss'] for r in runs['lora']) / GIB:.2f} | "
                    f"{max(r['peak_rss'] for r in runs['lllite']) / GIB:.2f} |")
    print()
    print(OtherLoad.describe(others.share()))
    print("| run | LoRA s/step | LLLite s/step | LLLite / LoRA (per round) | LoRA peak RSS GiB | LLLite peak RSS GiB |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
