"""The main job on the embedded default: train a LoRA on the tiny model with the bundled photos.

1. writes the embedded default model (a seeded tiny SD1.x checkpoint in the real layout);
2. writes a DreamBooth-style dataset from the photos scikit-image bundles (several aspect ratios);
3. trains a LoRA with train_network.py, aspect-ratio bucketing and latent caching on;
4. generates an image with the LoRA through gen_img.py and says where everything is.

Everything goes under demo_output/. Nothing is downloaded.
"""

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from library.cli import run  # noqa: E402

OUT = os.path.join(ROOT, "demo_output")
PHOTOS = {
    "astronaut": "an astronaut in a white suit",
    "chelsea": "a tabby cat",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket on a launch pad",
    "hubble_deep_field": "a field of distant galaxies",
    "immunohistochemistry": "a stained tissue sample",
}


def write_model(path: str) -> None:
    from library.models.families import SD1
    from library.models.saving import save_models
    from library.models.random_models import build_random_models

    save_models(build_random_models(SD1, "tiny", seed=0), path)


def write_dataset(folder: str) -> int:
    """Photos at a few sizes and aspect ratios, each with a caption file."""
    import numpy as np
    import skimage.data
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    sizes = [(192, 128), (128, 192), (160, 160)]
    for i, (name, caption) in enumerate(PHOTOS.items()):
        array = getattr(skimage.data, name)()
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        image = Image.fromarray(np.ascontiguousarray(array[..., :3])).resize(sizes[i % len(sizes)])
        image.save(os.path.join(folder, f"{name}.png"))
        with open(os.path.join(folder, f"{name}.txt"), "w", encoding="utf-8") as f:
            f.write(f"sks photo, {caption}")
    return len(PHOTOS)


def main():
    import train_network

    t0 = time.time()
    os.makedirs(OUT, exist_ok=True)
    model = os.path.join(OUT, "tiny-sd1.safetensors")
    if not os.path.isfile(model):
        write_model(model)
    print(f"1. embedded default model (tiny SD1.x, seed 0): {model}")

    data = os.path.join(OUT, "data")
    n = write_dataset(os.path.join(data, "4_sks photo"))
    print(f"2. dataset: {n} bundled photos with captions in {data}/4_sks photo (4 repeats)")

    lora_dir = os.path.join(OUT, "lora")
    print("3. training a LoRA (bucketing and latent caching on)...")
    train_network.main([
        "--pretrained_model_name_or_path", model,
        "--train_data_dir", data, "--caption_extension", ".txt",
        "--resolution", "128", "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "192",
        "--cache_latents", "--train_batch_size", "2",
        "--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "4",
        "--learning_rate", "1e-3", "--optimizer_type", "AdamW", "--lr_scheduler", "cosine", "--lr_warmup_steps", "0.1",
        "--max_train_steps", "24", "--seed", "42", "--max_data_loader_n_workers", "0",
        "--output_dir", lora_dir, "--output_name", "demo-lora", "--save_model_as", "safetensors",
    ])
    lora = os.path.join(lora_dir, "demo-lora.safetensors")
    print(f"\nLoRA written to {lora} ({os.path.getsize(lora) / 1024:.0f} KiB)")

    import gen_img

    images = os.path.join(OUT, "images")
    generate = ["--ckpt", model, "--network_module", "networks.lora", "--network_weights", lora,
                "--prompt", "sks photo, a tabby cat", "--W", "128", "--H", "128", "--steps", "8", "--seed", "1",
                "--outdir", images]
    print("4. generating an image with it: python gen_img.py " + " ".join(
        f"'{a}'" if " " in a else a for a in generate))
    status = gen_img.main(generate)
    if status:
        return status
    print(f"\nDone in {time.time() - t0:.0f} s. Image (prompt and seed in its PNG text): {images}")
    print("Use the LoRA like any sd-scripts LoRA: gen_img.py as above, or copy it into AUTOMATIC1111's "
          "models/Lora or ComfyUI's models/loras (for a real base model of the same family).")
    print(f"  Its training settings: python tools/show_metadata.py {lora}")
    return 0


if __name__ == "__main__":
    run(main)
