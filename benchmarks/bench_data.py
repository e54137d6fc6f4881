"""Benchmark of the data side: indexing image folders, bucketing metadata, latent cache I/O.

    python benchmarks/bench_data.py [--images 100000] [--entries 1000000] [--latents 10000] [--workdir DIR]

Phases, each in a fresh child process of this script so its peak RSS is its own:

* generate: N small JPEG files (24 templates of 64..120 px, each file made unique by a comment
  segment) in a DreamBooth folder `<workdir>/train/1_bench` (not timed against a target);
* index:    `dataset_scan.scan_dataset` over that folder (listing, header reads on 2 worker
  processes, buckets), as every training run does before loading a model;
* hash:     content hashes of the same files as the latent cache computes them (sha256 of the
  bytes), cold and then warm from the per-folder memo;
* bucket:   a fine-tuning metadata JSON of M entries with `image_size`: json load, vectorised
  bucket assignment, centre crops, bucket table and one epoch of batches;
* store:    10k latent entries of a 512x512 image (4x64x64 float32, 64 KiB) written, header-checked
  and read back with CRC check through the cache's entry files;
* cache:    `LatentCache.ensure` over 10k of the generated images with a stub VAE (fixed 8x8 average
  pooling, so the number measures hashing, decoding and cache I/O, not a model), cold then
  warm (a second run: everything is a hit), then `get` of every sample.

Targets (from the issue): 100k images indexed < 20 s on 2 cores; 1M entries bucketed < 30 s and
< 2 GiB peak RSS. The other rows have no target and are reported for reference. The page cache
is warm for reads (files were just written); nothing here measures a cold disk.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MIB = 1024 ** 2
INDEX_TARGET_S = 20.0
BUCKET_TARGET_S = 30.0
BUCKET_TARGET_RSS = 2 * 1024 ** 3


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def image_folder(workdir: str) -> str:
    return os.path.join(workdir, "train", "1_bench")


# ---------------------------------------------------------------------------------------------
# children: each prints one JSON line of results


def child_generate(workdir: str, n: int) -> dict:
    import numpy as np
    from PIL import Image

    folder = image_folder(workdir)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    templates = []
    for i in range(24):
        w, h = 64 + 8 * (i % 8), 64 + 8 * ((i * 3) % 8)
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=80)
        templates.append(buffer.getvalue())
    start = time.perf_counter()
    for i in range(n):
        data = templates[i % len(templates)]
        comment = f"bench image {i}".encode()
        # A COM segment right after SOI makes every file's bytes (and content hash) unique.
        unique = data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]
        with open(os.path.join(folder, f"{i:07d}.jpg"), "wb") as f:
            f.write(unique)
    return {"seconds": time.perf_counter() - start, "items": n}


def child_index(workdir: str) -> dict:
    from library.data.config import load_dataset_config
    from library.data.scan import scan_dataset

    args = argparse.Namespace(train_data_dir=os.path.join(workdir, "train"), resolution="64")
    start = time.perf_counter()
    config = load_dataset_config(None, args)
    scan = scan_dataset(config, 64, num_workers=2)
    seconds = time.perf_counter() - start
    images = sum(len(d.train) for d in scan.datasets)
    return {"seconds": seconds, "items": images, "bad": len(scan.bad_files)}


def child_hash(workdir: str, n: int) -> dict:
    from library.caching.keys import FileHasher
    from library.caching.store import BESIDE_IMAGES, EntryStore
    from library.caching.latent_cache import LATENTS_KIND

    folder = image_folder(workdir)
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".jpg"))[:n]
    store = EntryStore(BESIDE_IMAGES, LATENTS_KIND)
    memo = os.path.join(folder, ".sdtrain_cache", "file_hashes.json")
    if os.path.exists(memo):
        os.remove(memo)
    start = time.perf_counter()
    cold = FileHasher(store.memo_file)
    cold.digest_many(paths)
    cold.save()
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    warm = FileHasher(store.memo_file)
    warm.digest_many(paths)
    warm_s = time.perf_counter() - start
    size = sum(os.path.getsize(p) for p in paths)
    return {"cold": cold_s, "warm": warm_s, "items": len(paths), "bytes": size, "rehashed_warm": warm.hashed}


def child_bucket(workdir: str, n: int) -> dict:
    import numpy as np

    from library.data.bucketing import BucketAssigner, BucketSettings, centre_crops, make_epoch_batches

    path = os.path.join(workdir, "metadata_1m.json")
    start = time.perf_counter()
    with open(path, "rb") as f:
        metadata = json.load(f)
    sizes = np.array([record["image_size"] for record in metadata.values()], dtype=np.int64)
    loaded = time.perf_counter() - start
    settings = BucketSettings.from_flags(1024, True, 512, 2048, 32)
    assignments = BucketAssigner(settings).assign(sizes[:, 0], sizes[:, 1])
    lefts, tops = centre_crops(assignments)
    resolutions, index = assignments.bucket_table()
    batches = make_epoch_batches(resolutions, index, np.ones(len(index), dtype=np.int64), 4, seed=0, epoch=1)
    total = sum(len(batches[k].items) for k in range(0, len(batches), max(1, len(batches) // 1000)))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "load_seconds": loaded, "items": len(metadata), "buckets": len(resolutions),
            "batches": len(batches), "checked": total, "lefts": int(lefts.sum() % 7), "tops": int(tops.sum() % 7)}


def child_store(workdir: str, n: int) -> dict:
    import torch

    from library.caching.store import EntryStore, check_entry, read_entry, write_entry
    from library.caching.latent_cache import LATENT_FORMAT

    store = EntryStore(os.path.join(workdir, "store"), "latents")
    latents = torch.randn(4, 64, 64)
    keys = [f"{i:064x}" for i in range(n)]
    expected = {"latents": ("F32", (4, 64, 64))}
    start = time.perf_counter()
    for key in keys:
        path = store.path_for(key, None)
        store.prepare_dir(path)
        write_entry(path, {"latents": latents}, {"format": LATENT_FORMAT, "key": key})
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    bad = sum(check_entry(store.path_for(k, None), k, LATENT_FORMAT, expected) is not None for k in keys)
    check_s = time.perf_counter() - start
    start = time.perf_counter()
    total = 0.0
    for key in keys:
        total += float(read_entry(store.path_for(key, None), key, LATENT_FORMAT, expected)["latents"][0, 0, 0])
    read_s = time.perf_counter() - start
    return {"write": write_s, "check": check_s, "read": read_s, "items": n, "bad": bad,
            "bytes": n * latents.numel() * 4}


class _StubPosterior:
    def __init__(self, mean):
        import torch

        self.mean = mean
        self.std = torch.full_like(mean, 0.01)


class _StubOutput:
    def __init__(self, mean):
        self.latent_dist = _StubPosterior(mean)


def _stub_vae():
    """A VAE stand-in with the interface the cache uses: 8x8 average pooling + a 1x1 conv to 4 channels."""
    import torch
    from types import SimpleNamespace

    class StubVAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Conv2d(3, 4, 1)
            self.config = SimpleNamespace(latent_channels=4, block_out_channels=(1, 1, 1, 1))

        def encode(self, x):
            return _StubOutput(self.encoder(torch.nn.functional.avg_pool2d(x, 8)))

    torch.manual_seed(0)
    return StubVAE().eval()


def child_cache(workdir: str, n: int) -> dict:
    from library.data.bucketing import BucketSettings
    from library.caching.store import BESIDE_IMAGES
    from library.caching.tools import image_sizes, plan_centre_crops
    from library.caching.latent_cache import LatentCache, LatentSample

    folder = image_folder(workdir)
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".jpg"))[:n]
    cache_root = os.path.join(folder, ".sdtrain_cache")
    shutil.rmtree(cache_root, ignore_errors=True)
    plans = plan_centre_crops(paths, image_sizes(paths, 2), BucketSettings.from_flags(64))
    samples = [LatentSample(p, plan) for p, plan in zip(paths, plans)]
    vae = _stub_vae()
    start = time.perf_counter()
    cold = LatentCache(vae, None, BESIDE_IMAGES, vae_batch_size=16).ensure(samples)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    warm_cache = LatentCache(vae, None, BESIDE_IMAGES, vae_batch_size=16)
    warm = warm_cache.ensure(samples)
    warm_s = time.perf_counter() - start
    start = time.perf_counter()
    for sample in samples:
        warm_cache.get(sample)
    get_s = time.perf_counter() - start
    return {"cold": cold_s, "warm": warm_s, "get": get_s, "items": len(samples), "encoded": cold.encoded,
            "hits": warm.hits}


def child_identity(workdir: str) -> dict:
    """VAE identity of a full-size SD VAE encoder (built on meta, only the encoder filled)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    from library.models import vae_convert
    from library.models.families import SD1
    from library.caching.latent_cache import vae_identity

    with init_empty_weights():
        vae = AutoencoderKL.from_config(vae_convert.vae_config(SD1, "full"))
    vae.encoder.to_empty(device="cpu")
    vae.quant_conv.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    count = 0
    with torch.no_grad():
        for module in (vae.encoder, vae.quant_conv):
            for parameter in module.parameters():
                parameter.normal_(generator=generator)
                count += parameter.numel()
    start = time.perf_counter()
    vae_identity(vae)
    return {"seconds": time.perf_counter() - start, "items": count}


CHILDREN = {
    "identity": lambda a: child_identity(a.workdir),
    "generate": lambda a: child_generate(a.workdir, a.images),
    "index": lambda a: child_index(a.workdir),
    "hash": lambda a: child_hash(a.workdir, a.images),
    "bucket": lambda a: child_bucket(a.workdir, a.entries),
    "store": lambda a: child_store(a.workdir, a.latents),
    "cache": lambda a: child_cache(a.workdir, a.latents),
}


# ---------------------------------------------------------------------------------------------
# parent


def run_child(name: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", name, "--workdir", args.workdir,
               "--images", str(args.images), "--entries", str(args.entries), "--latents", str(args.latents)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_metadata(workdir: str, n: int) -> None:
    """A fine-tuning metadata JSON of n entries with captions and image sizes (not timed)."""
    import numpy as np

    rng = np.random.default_rng(1)
    widths = rng.integers(256, 4096, n)
    heights = rng.integers(256, 4096, n)
    with open(os.path.join(workdir, "metadata_1m.json"), "w", encoding="utf-8") as f:
        f.write("{")
        for i in range(n):
            sep = "," if i else ""
            f.write(f'{sep}"/data/img/{i:07d}.jpg":{{"caption":"a photo number {i}, outdoors, high quality",'
                    f'"image_size":[{int(widths[i])},{int(heights[i])}]}}')
        f.write("}")


def rate(items: int, seconds: float) -> str:
    return f"{items / seconds:,.0f}/s" if seconds > 0 else "-"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=100_000, help="image files to generate and index")
    p.add_argument("--entries", type=int, default=1_000_000, help="metadata entries to bucket")
    p.add_argument("--latents", type=int, default=10_000, help="latent cache entries to write and read")
    p.add_argument("--workdir", type=str, default=None, help="where to generate files (default: a temp dir, removed)")
    p.add_argument("--child", choices=sorted(CHILDREN), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        result = CHILDREN[args.child](args)
        result["peak_rss"] = peak_rss()
        print(json.dumps(result))
        return 0

    own_dir = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench_data_")
    try:
        return report(args)
    finally:
        if own_dir:
            shutil.rmtree(args.workdir, ignore_errors=True)


def report(args) -> int:
    print(f"workdir {args.workdir}; {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    gen = run_child("generate", args)
    print(f"generated {gen['items']:,} images in {gen['seconds']:.1f} s")
    write_metadata(args.workdir, args.entries)

    rows = []
    index = run_child("index", args)
    ok_index = index["seconds"] < INDEX_TARGET_S * args.images / 100_000
    rows.append((f"index {index['items']:,} images (scan_dataset, 2 workers)", index["seconds"],
                 rate(index["items"], index["seconds"]), index["peak_rss"],
                 f"< {INDEX_TARGET_S * args.images / 100_000:.1f} s", ok_index))
    hashed = run_child("hash", args)
    mb = hashed["bytes"] / MIB
    rows.append((f"hash {hashed['items']:,} files cold ({mb:.0f} MiB)", hashed["cold"],
                 rate(hashed["items"], hashed["cold"]), hashed["peak_rss"], "-", None))
    rows.append((f"hash {hashed['items']:,} files warm (memo; {hashed['rehashed_warm']} re-read)", hashed["warm"],
                 rate(hashed["items"], hashed["warm"]), hashed["peak_rss"], "-", None))
    bucket = run_child("bucket", args)
    target_s = BUCKET_TARGET_S * args.entries / 1_000_000
    ok_bucket = bucket["seconds"] < target_s and bucket["peak_rss"] < BUCKET_TARGET_RSS
    rows.append((f"bucket {bucket['items']:,} entries (json {bucket['load_seconds']:.1f} s, {bucket['buckets']} buckets)",
                 bucket["seconds"], rate(bucket["items"], bucket["seconds"]), bucket["peak_rss"],
                 f"< {target_s:.1f} s, < 2 GiB", ok_bucket))
    store = run_child("store", args)
    mb = store["bytes"] / MIB
    for what in ("write", "check", "read"):
        label = {"write": "write (atomic rename)", "check": "header check", "read": "read + CRC"}[what]
        rows.append((f"latent entries 4x64x64 f32: {label} {store['items']:,} ({mb:.0f} MiB)", store[what],
                     f"{rate(store['items'], store[what])}, {mb / store[what]:.0f} MiB/s", store["peak_rss"], "-", None))
    cache = run_child("cache", args)
    for what, label in (("cold", "ensure cold (hash+decode+encode+write)"), ("warm", "ensure warm (all hits)"),
                        ("get", "get every sample")):
        rows.append((f"LatentCache {cache['items']:,} samples, stub VAE: {label}", cache[what],
                     rate(cache["items"], cache[what]), cache["peak_rss"], "-", None))

    identity = run_child("identity", args)
    rows.append((f"VAE identity: sha256 of a full-size SD VAE encoder ({identity['items'] / 1e6:.0f}M params f32)",
                 identity["seconds"], f"{identity['items'] * 4 / MIB / identity['seconds']:.0f} MiB/s",
                 identity["peak_rss"], "-", None))

    width = max(len(r[0]) for r in rows)
    print(f"\n{'phase'.ljust(width)}  {'seconds':>8}  {'throughput':>24}  {'peak RSS':>9}  target")
    for label, seconds, throughput, rss, target, ok in rows:
        verdict = "" if ok is None else ("  ok" if ok else "  MISSED")
        print(f"{label.ljust(width)}  {seconds:8.2f}  {throughput:>24}  {rss / MIB:7.0f} M  {target}{verdict}")
    missed = [r for r in rows if r[5] is False]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
