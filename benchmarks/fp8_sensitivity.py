"""How much a rounding of the U-Net's weights moves its prediction and loss, on the benchmark's model.

    python benchmarks/fp8_sensitivity.py [--family sdxl] [--timesteps 500] [--noise_draws 5]

Puts the fp8 loss offset of `bench_train_network.py --fp8` in context. One forward of the cached
seeded full-size U-Net (the LoRA benchmark's fixed input: a seeded latent, one caption) with its
Linear/Conv2d weights replaced, one variant at a time, by:

* our fp8 rounding (float8_e4m3fn with a power-of-two scale per tensor, library/models/fp8_weights.py);
* sd-scripts' plain cast to float8_e4m3fn (no scale);
* random multiplicative noise of the same RMS (2.65 %), several draws;
* bf16 rounding.

Printed per variant and timestep: the prediction's relative change, the loss against the noise
before and after, and the prediction's norm after / before. Text encoders stay in float32.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_checkpoints import DEFAULT_CACHE, ensure_checkpoint  # noqa: E402

NOISE_RMS = 0.0265  # fp8_weights' measured RMS rounding error per weight


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="sdxl", choices=("sd1", "sdxl"))
    p.add_argument("--timesteps", default="500", help="comma-separated timesteps")
    p.add_argument("--noise_draws", type=int, default=5)
    p.add_argument("--cache_dir", default=DEFAULT_CACHE)
    args = p.parse_args(argv)

    import torch

    from library.models.fp8_weights import FP8, dequantize, quantize
    from library.models.loading import load_models
    from library.text.encoding import TextConditioner, training_clip_skip
    from library.text.tokenizer import load_tokenizers
    from train_children import BareIteration

    path = ensure_checkpoint(args.cache_dir, args.family, False)
    models = load_models(path, sdxl=args.family == "sdxl", dtype=torch.float32)
    models.vae = None
    for module in [models.unet, *models.text_encoders]:
        module.requires_grad_(False)
        module.eval()
    conditioner = TextConditioner(models.family, load_tokenizers(models.family, path), models.text_encoders)
    clip_skip, _ = training_clip_skip(models.family, None)
    fixed = BareIteration(models.family, models.unet, conditioner, clip_skip, [], False)
    timesteps = [int(t) for t in args.timesteps.split(",")]
    layers = [m for m in models.unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    originals = [m.weight.data.to(torch.float16) for m in layers]  # the file's fp16, so exact

    @torch.no_grad()
    def predictions() -> list:
        cond = conditioner.encode_tokens(fixed.ids, clip_skip)
        kwargs = {}
        if models.family.is_sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": fixed.time_ids}
        return [models.unet(fixed.noisy, torch.tensor([t]), cond.context, **kwargs).sample for t in timesteps]

    def loss(pred) -> float:
        return torch.nn.functional.mse_loss(pred, fixed.noise).item()

    generator = torch.Generator().manual_seed(1)

    def fp8_scaled(w):
        held, exponent = quantize(w)
        return dequantize(held, exponent, torch.float32)

    variants = [("fp8, scale per tensor (ours)", fp8_scaled),
                ("fp8, plain cast (sd-scripts)", lambda w: w.to(FP8).float())]
    variants += [(f"noise {100 * NOISE_RMS:.2f} %, draw {i + 1}",
                  lambda w: w * (1 + NOISE_RMS * torch.randn(w.shape, generator=generator)))
                 for i in range(args.noise_draws)]
    variants.append(("bf16 rounding", lambda w: w.to(torch.bfloat16).float()))

    base = predictions()
    print(f"{args.family} U-Net, timesteps {timesteps}; loss without change: "
          + ", ".join(f"{loss(b):.4f}" for b in base), flush=True)
    print("| weights | prediction change | loss after | norm after / before |")
    print("|---|---|---|---|")
    for name, change in variants:
        for layer, original in zip(layers, originals):
            layer.weight.data.copy_(change(original.float()))
        after = predictions()
        print(f"| {name} | " + ", ".join(f"{((a - b).norm() / b.norm()).item():.3f}" for a, b in zip(after, base))
              + " | " + ", ".join(f"{loss(a):.4f}" for a in after)
              + " | " + ", ".join(f"{(a.norm() / b.norm()).item():.3f}" for a, b in zip(after, base)) + " |",
              flush=True)
    for layer, original in zip(layers, originals):
        layer.weight.data.copy_(original.float())


if __name__ == "__main__":
    main()
