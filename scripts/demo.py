"""The main job on the embedded default: build the tiny SD1 model, convert it both ways, check it.

Writes everything under demo_output/ and prints what it did.
"""

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from library.cli import run  # noqa: E402

OUT = os.path.join(ROOT, "demo_output")


def main():
    import torch

    from library.families import SD1
    from library.model_loading import load_models
    from library.model_saving import save_models
    from library.random_models import build_random_models

    os.makedirs(OUT, exist_ok=True)
    t0 = time.time()
    single = os.path.join(OUT, "tiny-sd1.safetensors")
    models = build_random_models(SD1, "tiny", seed=0)
    save_models(models, single)
    print(f"1. built the embedded default model (tiny SD1.x, seed 0): {single}")

    folder = os.path.join(OUT, "tiny-sd1-diffusers")
    save_models(load_models(single), folder, "diffusers_safetensors")
    print(f"2. converted the single file to a diffusers folder: {folder}")

    back = os.path.join(OUT, "tiny-sd1-roundtrip.ckpt")
    save_models(load_models(folder), back)
    print(f"3. converted the diffusers folder back to a single file: {back}")

    a, b = load_models(single), load_models(back)
    same = all(torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values()))
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    with torch.no_grad():
        hidden = a.text_encoders[0](ids).last_hidden_state
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        out_a = a.unet(latents, 500, hidden).sample
        out_b = b.unet(latents, 500, b.text_encoders[0](ids).last_hidden_state).sample
    print(f"4. weights identical after the round trip: {same}; U-Net outputs identical: {torch.equal(out_a, out_b)}")
    print(f"done in {time.time() - t0:.1f} s; files are in {OUT}")
    return 0 if same and torch.equal(out_a, out_b) else 1


if __name__ == "__main__":
    run(main)
