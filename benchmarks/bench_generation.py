"""Benchmark of image generation: our engine against a plain diffusers StableDiffusionPipeline.

    python benchmarks/bench_generation.py [--sizes tiny,full] [--steps 20] [--runs 3] [--sampler ddim]
                                          [--tiny_resolution 64] [--full_resolution 256]

For each model size (SD1.5 layout: `tiny` test widths, `full` = real SD1.5 size, seeded random
weights in float32, about 4 GB of RAM) one image is generated per run, with the same U-Net, VAE, text
encoder, scheduler class, seed, prompt, negative prompt, guidance scale and size:

* diffusers: `StableDiffusionPipeline(...)(prompt=..., negative_prompt=...)` — its own prompt encoding
  and VAE decoding, output PIL;
* ours: `GenerationEngine.generate` — our weighted long-prompt encoding, the same pipeline class fed
  with `prompt_embeds`, our VAE decoding, output PIL.

Runs alternate (ours first on even runs) after one untimed warm-up each, so that other load on the
machine falls on both alike; the table shows median wall and CPU seconds per image. Target: ours
<= 1.05 x diffusers. The first warm-up images are compared pixel by pixel as a sanity check (equal
settings should give the same image).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET = 1.05
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed, sharp focus"
NEGATIVE = "blurry, low quality"
SEED = 1234


def timed(fn) -> tuple:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def bench_size(size: str, resolution: int, steps: int, runs: int, sampler: str, threads: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from diffusers import StableDiffusionPipeline

    from library.models.families import SD1
    from library.generation.engine import BatchSettings, GenerationEngine, ImageJob
    from library.models.random_models import build_random_models
    from library.generation.samplers import make_scheduler
    from library.text.tokenizer import load_tokenizers

    build_start = time.perf_counter()
    models = build_random_models(SD1, size, seed=0, dtype=torch.float32)
    build_seconds = time.perf_counter() - build_start
    tokenizers = load_tokenizers(SD1)
    engine = GenerationEngine(models, tokenizers, "cpu")
    pipe = StableDiffusionPipeline(
        vae=models.vae, text_encoder=models.text_encoders[0], tokenizer=tokenizers[0], unet=models.unet,
        scheduler=make_scheduler(sampler), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    settings = BatchSettings(resolution, resolution, steps=steps, scale=7.5, sampler=sampler)

    def ours():
        return engine.generate([ImageJob(PROMPT, NEGATIVE, SEED)], settings)[0]

    def theirs():
        pipe.scheduler = make_scheduler(sampler)  # a fresh scheduler each call, as ours gets
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
                    height=resolution, width=resolution, generator=torch.Generator("cpu").manual_seed(SEED)).images[0]

    with torch.no_grad():
        first_ours, first_theirs = ours(), theirs()  # warm-up
        difference = np.abs(np.asarray(first_ours, dtype=np.int16) - np.asarray(first_theirs, dtype=np.int16)).max()
        times = {"ours": [], "diffusers": []}
        for run in range(runs):
            order = [("ours", ours), ("diffusers", theirs)]
            for name, fn in order if run % 2 == 0 else order[::-1]:
                wall, cpu, _ = timed(fn)
                times[name].append((wall, cpu))
                print(f"  {size} run {run + 1}/{runs} {name}: {wall:.2f} s (CPU {cpu:.2f} s)", file=sys.stderr)
    del engine, pipe, models
    return {"size": size, "resolution": resolution, "threads": threads, "build_seconds": build_seconds, "max_pixel_difference": int(difference),
            **{f"{name}_{kind}": statistics.median(t[i] for t in values)
               for name, values in times.items() for i, kind in enumerate(("wall", "cpu"))}}


def print_table(results: list, steps: int, sampler: str, runs: int) -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n### Generation, {datetime.date.today()} ({sampler}, {steps} steps, batch 1, CFG 7.5, median of {runs}; "
          f"{os.cpu_count()} CPUs, load average {load:.1f})\n")
    print("| model | size | threads | diffusers s/img (CPU) | ours s/img (CPU) | ours img/s | ratio (CPU ratio) | target "
          "| verdict | max pixel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio, cpu_ratio = r["ours_wall"] / r["diffusers_wall"], r["ours_cpu"] / r["diffusers_cpu"]
        verdict = "ok" if ratio <= TARGET else "MISS"
        name = "SD1.5 layout, tiny" if r["size"] == "tiny" else "SD1.5 full size"
        print(f"| {name} | {r['resolution']}x{r['resolution']} | {r['threads']} | {r['diffusers_wall']:.3f} ({r['diffusers_cpu']:.3f}) | "
              f"{r['ours_wall']:.3f} ({r['ours_cpu']:.3f}) | {1 / r['ours_wall']:.3f} | {ratio:.3f}x ({cpu_ratio:.3f}x) | "
              f"<= {TARGET}x | {verdict} | {r['max_pixel_difference']} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,full", help="comma list of tiny, full")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--tiny_resolution", type=int, default=64)
    parser.add_argument("--full_resolution", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 for tiny, which is bound by per-op overhead, all CPUs for full)")
    args = parser.parse_args(argv)
    results = []
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        resolution = args.tiny_resolution if size == "tiny" else args.full_resolution
        print(f"{size}: building the model and timing {args.runs} runs at {resolution}x{resolution}...", file=sys.stderr)
        threads = args.threads or (1 if size == "tiny" else os.cpu_count())
        results.append(bench_size(size, resolution, args.steps, args.runs, args.sampler, threads))
    print_table(results, args.steps, args.sampler, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
