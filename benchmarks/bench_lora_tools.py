"""Benchmark of the LoRA tools on full-size SDXL fp16 files: extraction, resize, merge into a checkpoint.

    python benchmarks/bench_lora_tools.py [--cache_dir DIR] [--skip_generate] [--rank 128] [--dim 32]

Inputs, generated once and cached in --cache_dir: two seeded random SDXL fp16 checkpoints
(tools/make_random_model.py, seeds 0 and 1, 6.5 GiB each) and a random rank-128 SDXL LoRA over the
modules networks.lora trains (U-Net and both text encoders, fp16). Each measurement runs in a fresh
child process of this script; the tool's `main` is timed after its libraries are imported, and
peak RSS is the child's `ru_maxrss` after resetting the high-water mark just before the call.

Rows:
* extract: networks/extract_lora_from_models.py --dim D from the two checkpoints;
  beside it, "SVDs alone": the same number of float32 SVDs of the same shapes (random matrices made
  before the clock starts), nothing else;
* resize: networks/resize_lora.py --new_rank 32 of the rank-128 LoRA; beside it the SVDs alone: the
  same factor-based SVD (networks.lora_svd.svd_of_product) of every module, inputs already in memory;
* merge: networks/sdxl_merge_lora.py of the rank-128 LoRA into a checkpoint (written as fp16).

Targets (from the issue): peak RSS <= 1.2 x one input checkpoint for extraction and merge
(sd-scripts holds both models in float32, about 4 x the fp16 file); extraction and resize time
<= 1.5 x the SVDs alone. Children run with OMP_WAIT_POLICY=PASSIVE: on a machine shared with other
jobs, OpenMP's default spin-waiting makes every multi-threaded SVD several times slower (tool and
baseline alike).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from bench_checkpoints import DEFAULT_CACHE, ensure_checkpoint  # noqa: E402
from bench_model_io import measured  # noqa: E402
from machine_load import OtherLoad  # noqa: E402

GIB = 1024 ** 3
RSS_FACTOR = 1.2
TIME_FACTOR = 1.5


# ---------------------------------------------------------------------------------------------
# children (one JSON line each)


def child_make_lora(checkpoint: str, out: str, rank: int) -> dict:
    """A random rank-`rank` LoRA over the layers networks.lora trains on this checkpoint (fp16)."""
    import torch

    from library.models.checkpoint_io import TensorSource
    from library.models.network_targets import checkpoint_family
    from networks.lora_extraction import extraction_layers
    from networks.lora_files import save_lora

    generator = torch.Generator().manual_seed(0)
    tensors = {}
    with TensorSource(checkpoint) as source:
        for layer in extraction_layers(source, checkpoint_family(checkpoint, source.names), rank, None):
            out_dim, in_dim = layer.target.shape[0], int(torch.Size(layer.target.shape[1:]).numel())
            down = torch.randn(rank, in_dim, generator=generator) / in_dim ** 0.5
            up = torch.randn(out_dim, rank, generator=generator) * 0.01
            tensors[f"{layer.name}.lora_down.weight"] = down.reshape(rank, *layer.target.shape[1:]).half()
            tensors[f"{layer.name}.lora_up.weight"] = up.reshape(out_dim, rank, *([1, 1] if len(layer.target.shape) == 4 else [])).half()
            tensors[f"{layer.name}.alpha"] = torch.tensor(float(rank)).half()
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}
    save_lora(out, tensors, meta)
    return {"modules": len(tensors) // 3, "bytes": os.path.getsize(out)}


def child_tool(script: str, argv: list) -> dict:
    """Time a tool's main(argv), its libraries imported first."""
    import importlib

    import torch  # noqa: F401
    import tqdm  # noqa: F401 - imported before the clock starts

    module = importlib.import_module(script)
    _, stats = measured(lambda: module.main(argv))
    return stats


def child_svd_extract(checkpoint: str, dim: int) -> dict:
    """The SVDs extraction runs, of random float32 matrices of the same shapes, timed alone."""
    import torch

    from library.models.checkpoint_io import TensorSource
    from library.models.network_targets import checkpoint_family
    from networks import lora_svd
    from networks.lora_extraction import extraction_layers

    with TensorSource(checkpoint) as source:
        shapes = [l.target.shape for l in extraction_layers(source, checkpoint_family(checkpoint, source.names), dim, None)]
    generator = torch.Generator().manual_seed(0)
    total = 0.0
    for shape in shapes:
        matrix = torch.randn(*shape, generator=generator)
        start = time.perf_counter()
        lora_svd.svd(matrix)
        total += time.perf_counter() - start
    return {"seconds": total, "svds": len(shapes)}


def child_svd_resize(lora: str) -> dict:
    """The factor-based SVDs resize runs on every module of the LoRA, inputs in memory, timed alone."""
    from library.models.safetensors_io import load_tensors
    from networks import lora_svd

    tensors = load_tensors(lora, zero_copy=False)
    names = [k[: -len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight")]
    total = 0.0
    for name in names:
        up = tensors[f"{name}.lora_up.weight"].flatten(1)
        down = tensors[f"{name}.lora_down.weight"].flatten(1)
        start = time.perf_counter()
        lora_svd.svd_of_product(up, down)
        total += time.perf_counter() - start
    return {"seconds": total, "svds": len(names)}


CHILDREN = {
    "make_lora": lambda a: child_make_lora(a.checkpoint, a.out, a.rank),
    "tool": lambda a: child_tool(a.script, json.loads(a.argv)),
    "svd_extract": lambda a: child_svd_extract(a.checkpoint, a.dim),
    "svd_resize": lambda a: child_svd_resize(a.lora),
}


def run_child(name: str, **kwargs) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name]
    for key, value in kwargs.items():
        cmd += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=REPO)
    out = subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# parent


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache_dir", default=DEFAULT_CACHE, help="where the generated inputs are kept")
    p.add_argument("--skip_generate", action="store_true", help="do not generate missing inputs; stop instead")
    p.add_argument("--rank", type=int, default=128, help="rank of the generated LoRA (default 128)")
    p.add_argument("--dim", type=int, default=32, help="rank of the extracted LoRA (default 32)")
    p.add_argument("--new_rank", type=int, default=32, help="rank the LoRA is resized to (default 32)")
    p.add_argument("--only", default="extract,resize,merge", help="comma list of rows to run")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    for name in ("checkpoint", "out", "script", "argv", "lora"):
        p.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)), flush=True)
        return

    org = ensure_checkpoint(args.cache_dir, "sdxl", args.skip_generate, seed=0)
    tuned = ensure_checkpoint(args.cache_dir, "sdxl", args.skip_generate, seed=1)
    if org is None or tuned is None:
        return
    lora = os.path.join(args.cache_dir, f"sdxl-lora-rank{args.rank}-fp16.safetensors")
    if not os.path.isfile(lora):
        if args.skip_generate:
            print(f"no cached LoRA at {lora}; stopped (--skip_generate)")
            return
        print(f"generating {lora} ...", flush=True)
        print(run_child("make_lora", checkpoint=org, out=lora, rank=args.rank), flush=True)
    size = os.path.getsize(org)
    work = os.path.join(args.cache_dir, "work")
    os.makedirs(work, exist_ok=True)
    only = set(args.only.split(","))
    load = OtherLoad()
    rows = []

    def row(title, stats, svd=None, rss_target=True):
        peak = stats["peak_rss"]
        verdicts = []
        if rss_target:
            verdicts.append("RSS ok" if peak <= RSS_FACTOR * size else "RSS MISS")
        if svd is not None:
            verdicts.append("time ok" if stats["seconds"] <= TIME_FACTOR * svd["seconds"] else "time MISS")
        rows.append([title, f"{stats['seconds']:.1f}", f"{stats['cpu_seconds']:.1f}", f"{peak / GIB:.2f}",
                     f"{peak / size:.2f}", f"{svd['seconds']:.1f} ({svd['svds']})" if svd else "-",
                     f"{stats['seconds'] / svd['seconds']:.2f}" if svd else "-", ", ".join(verdicts) or "info"])
        print(" | ".join(rows[-1]), flush=True)

    if "extract" in only:
        out = os.path.join(work, "extracted.safetensors")
        stats = run_child("tool", script="networks.extract_lora_from_models", argv=[
            "--model_org", org, "--model_tuned", tuned, "--save_to", out, "--dim", str(args.dim)])
        row(f"extract --dim {args.dim} (U-Net + both text encoders)", stats, run_child("svd_extract", checkpoint=org,
                                                                                         dim=args.dim))
    if "resize" in only:
        out = os.path.join(work, "resized.safetensors")
        stats = run_child("tool", script="networks.resize_lora", argv=[
            "--model", lora, "--save_to", out, "--new_rank", str(args.new_rank), "--save_precision", "fp16"])
        row(f"resize rank {args.rank} -> {args.new_rank}", stats, run_child("svd_resize", lora=lora), rss_target=False)
    if "merge" in only:
        out = os.path.join(work, "merged.safetensors")
        stats = run_child("tool", script="networks.sdxl_merge_lora", argv=[
            "--sd_model", org, "--models", lora, "--save_to", out])
        row(f"merge rank-{args.rank} LoRA into the checkpoint", stats)
    for name in os.listdir(work):
        os.remove(os.path.join(work, name))

    print()
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"checkpoint {size / GIB:.2f} GiB; {OtherLoad.describe(load.share())}")
    header = ["task", "seconds", "CPU s", "peak RSS GiB", "peak / checkpoint", "SVDs alone s (count)",
              "time / SVDs", "verdict"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
