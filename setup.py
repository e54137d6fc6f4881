"""Install sdtrain: `pip install -e .` (base install runs on CPU-only machines)."""

import os

from setuptools import find_packages, setup

# onnxruntime (CPU) and onnxruntime-gpu install the same `onnxruntime` package over each other, and an
# extra can only add to the base list, so the build is chosen here instead of by an extra:
# `SDTRAIN_ONNXRUNTIME=gpu pip install -e .` takes the CUDA build in place of the CPU one.
ONNXRUNTIME = "onnxruntime-gpu==1.31.1" if os.environ.get("SDTRAIN_ONNXRUNTIME") == "gpu" else "onnxruntime==1.31.1"

BASE = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "diffusers==0.42.1",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "accelerate==1.15.0",
    "safetensors==0.8.0",
    "huggingface-hub==2.4.0",
    "open-clip-torch==3.3.0",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "imagesize==2.0.1",
    "tqdm==4.70.1",
    "toml==0.10.2",
    "ftfy==6.3.1",
    "regex==2026.11.19",
    "dadaptation==3.2",
    "prodigyopt==1.1.2",
    "schedulefree==1.4.1",
    "lion-pytorch==0.2.5",
    "tensorboard==2.21.0",
    ONNXRUNTIME,
    "opencv-python-headless==4.14.0.94",  # tools/canny.py
]

setup(
    name="sdtrain",
    version="0.1.0",
    description="Stable Diffusion training and tools, compatible with kohya-ss/sd-scripts",
    packages=find_packages(include=["library", "library.*", "networks", "networks.*", "tools", "tools.*",
                                    "finetune", "finetune.*"]),
    python_requires=">=3.11",
    install_requires=BASE,
    extras_require={
        # CUDA-only accelerators: used when present, a clear warning when a flag asks for a missing one
        "cuda": ["xformers", "bitsandbytes==0.50.2"],
        "lycoris": ["lycoris-lora==3.4.0"],
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "scikit-image==0.26.0", "onnx==1.23.2", "peft==0.21.2"],
    },
)
