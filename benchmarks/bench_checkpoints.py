"""The full-size random checkpoints the benchmarks share, generated once into a cache folder."""

import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "sdtrain-bench")


def checkpoint_path(cache_dir: str, family: str, seed: int = 0) -> str:
    return os.path.join(cache_dir, f"{family}-full-fp16-seed{seed}.safetensors")


def ensure_checkpoint(cache_dir: str, family: str, skip_generate: bool, seed: int = 0) -> str | None:
    """The cached fp16 full-size checkpoint of `family`, made with tools/make_random_model.py if missing."""
    path = checkpoint_path(cache_dir, family, seed)
    if os.path.isfile(path):
        return path
    if skip_generate:
        print(f"[{family}] no cached checkpoint at {path}; skipped (--skip_generate)", flush=True)
        return None
    os.makedirs(cache_dir, exist_ok=True)
    print(f"[{family}] generating {path} (once; cached for later runs)...", flush=True)
    start = time.perf_counter()
    cmd = [sys.executable, os.path.join(REPO, "tools", "make_random_model.py"),
           "--family", family, "--size", "full", "--precision", "fp16", "--seed", str(seed), path]
    subprocess.run(cmd, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), check=True)
    print(f"[{family}] generated in {time.perf_counter() - start:.1f} s", flush=True)
    return path
