"""Assign fine-tuning images to buckets, record it in the metadata, and cache their latents.

    python finetune/prepare_buckets_latents.py TRAIN_DATA_DIR IN_JSON OUT_JSON MODEL [--max_resolution 512,512]
        [--min_bucket_reso 256] [--max_bucket_reso 1024] [--bucket_reso_steps 64] [--bucket_no_upscale]
        [--batch_size 4] [--flip_aug] [--alpha_mask] [--full_path] [--recursive] [--cache_dir DIR]

OUT_JSON is IN_JSON plus, for every image, "train_resolution" (its bucket, floored to multiples of
8, as sd-scripts writes it) and "image_size" ([W, H], so training need not open the file to
bucket it). The latents are really written (sd-scripts' version of this script writes none): into
the latent cache where a fine-tuning run with `--in_json OUT_JSON --resolution <max_resolution>
--enable_bucket` and the same bucket flags, model and precision looks them up (by default a
.sdtrain_cache folder in each image folder; pass the same --cache_dir to both otherwise).
Images are centre-cropped, as training without random_crop does. Intact cached entries are
always kept (`--skip_existing` is accepted for compatibility).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_data_dir", help="folder of the training images")
    p.add_argument("in_json", help="metadata file to read (.json or .jsonl)")
    p.add_argument("out_json", help="metadata file to write")
    p.add_argument("model_name_or_path", help="checkpoint or diffusers folder whose VAE encodes the latents")
    p.add_argument("--v2", action="store_true", help="accepted for compatibility (the model type is detected)")
    p.add_argument("--sdxl", action="store_true", help="accepted for compatibility (the model type is detected)")
    p.add_argument("--vae", type=str, default=None, help="use this VAE (file or diffusers folder) instead of the model's")
    p.add_argument("--batch_size", type=int, default=1, help="images per VAE call")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None, help="image-decoding threads (default: up to 4)")
    p.add_argument("--max_resolution", type=str, default="512,512",
                   help="training resolution 'width,height' (max bucket area); pass it as --resolution when training")
    p.add_argument("--min_bucket_reso", type=int, default=256, help="minimum bucket side")
    p.add_argument("--max_bucket_reso", type=int, default=1024, help="maximum bucket side")
    p.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this")
    p.add_argument("--bucket_no_upscale", action="store_true", help="per-image buckets, never enlarging images")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no",
                   help="VAE precision; use the training run's value (the cache is keyed on it)")
    p.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 under --mixed_precision")
    p.add_argument("--full_path", action="store_true", help="metadata keys are absolute paths instead of stems")
    p.add_argument("--flip_aug", action="store_true", help="also cache the latents of the flipped images")
    p.add_argument("--alpha_mask", action="store_true", help="also cache the alpha masks (masked-loss training)")
    p.add_argument("--skip_existing", action="store_true", help="accepted for compatibility: intact entries are always kept")
    p.add_argument("--recursive", action="store_true", help="also take images from sub-folders")
    p.add_argument("--cache_dir", type=str, default=None,
                   help="latent cache folder (default: a .sdtrain_cache folder inside each image folder)")
    return p


def bucket_report(plans, sizes) -> list:
    """Log lines: images per bucket, and the mean |bucket AR - image AR|."""
    counts: dict = {}
    for plan in plans:
        counts[plan.bucket] = counts.get(plan.bucket, 0) + 1
    lines = [f"bucket {i} {list(reso)}: {counts[reso]}" for i, reso in enumerate(sorted(counts))]
    errors = [abs(p.bucket[0] / p.bucket[1] - w / h) for p, (w, h) in zip(plans, sizes)]
    lines.append(f"mean ar error: {sum(errors) / max(1, len(errors)):.4f}")
    return lines


def main(argv=None):
    args = build_parser().parse_args(argv)
    import torch

    from library.data.bucketing import BucketSettings
    from library.errors import UserError
    from library.caching.settings import disk_location
    from library.caching.tools import detect_model_family, image_sizes, load_vae_for_caching, plan_centre_crops
    from tools.cache_latents import vae_dtype
    from library.caching.latent_cache import LatentCache, LatentSample, with_flips
    from library.data.metadata_json import image_key, list_images, read_metadata, write_metadata

    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: must be at least 1")
    settings = BucketSettings.from_flags(args.max_resolution, True, args.min_bucket_reso, args.max_bucket_reso,
                                         args.bucket_reso_steps, args.bucket_no_upscale)
    metadata = read_metadata(args.in_json)
    images = list_images(args.train_data_dir, args.recursive)
    if not images:
        raise UserError(f"{args.train_data_dir}: no images found" + ("" if args.recursive else " (sub-folders need --recursive)"))
    print(f"found {len(images)} images")
    workers = max(1, min(4, os.cpu_count() or 1))
    sizes = image_sizes(images, workers)
    plans = plan_centre_crops(images, sizes, settings)

    for path, size, plan in zip(images, sizes, plans):
        entry = metadata.setdefault(image_key(path, args.full_path), {})
        bw, bh = plan.bucket
        entry["train_resolution"] = [bw - bw % 8, bh - bh % 8]
        entry["image_size"] = [int(size[0]), int(size[1])]

    family = detect_model_family(args.model_name_or_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = load_vae_for_caching(args.model_name_or_path, family, args.vae, vae_dtype(args, device, family))
    vae.to(device).eval()
    samples = [LatentSample(path, plan, False, args.alpha_mask) for path, plan in zip(images, plans)]
    if args.flip_aug:
        samples = with_flips(samples)
    cache = LatentCache(vae, family, disk_location(args.cache_dir), args.batch_size,
                        load_workers=args.max_data_loader_n_workers)
    stats = cache.ensure(samples)
    for line in bucket_report(plans, sizes):
        print(line)
    print(f"latents: {stats.summary('samples')}")
    write_metadata(args.out_json, metadata)
    print(f"wrote {args.out_json}")


if __name__ == "__main__":
    run(main)
