"""What a training run holds (`Run`) and what a task supplies to the loop (`Task`).

`library.training.trainer` builds one `Run` per training run and drives a `Task` (network, full
model, embedding, ControlNet-LLLite) through the hooks below; `step_generator` is the seeding rule
that makes a resumed run replay an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch


class Task:
    """What differs between training a network, a full model, an embedding or LLLite.

    Subclasses override the hooks below; the loop calls them in this order: `validate_args`,
    `check_data` (before any model loads), `load_dtypes`, `setup`, `configure_dataset`,
    `param_groups`, `wrap_optimizer`, then per step `before_step`, `before_unet` (inside the loss,
    also for validation) and `after_step`, and `save` at save points.
    """

    name = "task"
    sdxl: Optional[bool] = None  # True for sdxl_* scripts, False for SD1/SD2 scripts
    artifact_ext = ".safetensors"
    saves_vae = False  # whether the files it writes hold the VAE
    # with --masked_loss, ControlNet subsets' conditioning images weight the loss (their red channel);
    # a task that feeds them to the model as hints sets this False
    conditioning_images_are_masks = True
    # `load_dataset_config` keywords: which dataset kinds the trainer accepts (default: its flags decide)
    dataset_support: Dict[str, bool] = {}

    def validate_args(self, args) -> None:
        pass

    def check_data(self, scan, args) -> None:
        """Task-specific checks of the scanned dataset, before any model loads."""

    def load_dtypes(self, precision) -> Dict[str, torch.dtype]:
        """Parts ("unet", "vae", "text_encoder", "text_encoder_2") to read in another dtype than
        the frozen weights' one: trained parts in their training dtype, so nothing is read twice."""
        return {}

    def frozen_weights_may_stay_half(self, args) -> bool:
        """Whether frozen layers may keep the file's fp16/bf16 and upcast per op in a float32 run
        (library/models/frozen_weights.py): only when nothing computes with their weight directly."""
        return True

    def fp8_base_refusal(self, args) -> Optional[str]:
        """Why --fp8_base / --fp8_base_unet cannot apply to this task's run (None: they can). fp8 holds
        frozen Linear/Conv2d weights (library/models/fp8_weights.py), which only the layers' own
        forward may read: a task that trains the U-Net, or computes with a frozen weight directly, refuses."""
        return None

    def merge_base_weights(self, models, args, precision) -> None:
        """Merge weights into the frozen base model as loaded (on the CPU, before frozen layers are
        held, e.g. in fp8): the network task's --base_weights."""

    def needs_vae_after_caching(self, args) -> bool:
        """Whether the VAE must stay loaded once every latent is cached: for sample images, or for
        a task that saves it."""
        return self.saves_vae or bool(args.sample_prompts)

    def setup(self, run: "Run") -> None:
        raise NotImplementedError

    def configure_dataset(self, run: "Run") -> None:
        """Adjust the dataset (caption rewrites...) before caches are filled and batches drawn."""

    def wrap_optimizer(self, run: "Run", optimizer):
        """The optimizer the loop steps. One with `steps_in_backward = True` steps every tensor
        during the backward pass: the loop then skips its own gradient sync, clipping and step."""
        return optimizer

    def trains_text_encoder(self, index: int) -> bool:
        return False

    def trains_unet(self) -> bool:
        return True

    def param_groups(self, run: "Run") -> tuple:
        raise NotImplementedError

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        """Tensors a state folder must hold to resume."""
        raise NotImplementedError

    def load_trainable_state(self, tensors: Dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def before_step(self, run: "Run", batch: dict) -> None:
        pass

    def after_step(self, run: "Run") -> Dict[str, float]:
        return {}

    def save(self, run: "Run", path: str, epoch: int, step: int, final: bool) -> None:
        raise NotImplementedError

    def unet_extra_kwargs(self, run: "Run", batch: dict) -> dict:
        return {}

    def before_unet(self, run: "Run", batch: dict) -> None:
        """Right before the U-Net runs on `batch` (training and validation): e.g. hand a control
        network the batch's hint images."""

    def sampling_networks(self) -> list:
        """Trainable modules to hold in eval mode while sample images are made."""
        return []

    def sampling_control_nets(self) -> list:
        """Control networks that sample images steer with each prompt's guide image (`--cn`)."""
        return []

    def prompt_replacements(self) -> Optional[dict]:
        """Prompt rewrites for sample images (textual inversion expands its token)."""
        return None


@dataclass
class Run:
    args: Any
    accelerator: Any
    device: torch.device
    precision: Any
    family: Any
    models: Any
    tokenizers: list
    conditioner: Any
    dataset: Any
    noise_scheduler: Any
    snr: torch.Tensor
    noise_settings: Any
    loss_settings: Any
    seed: int
    num_epochs: int = 1
    max_steps: int = 1
    steps_per_epoch: int = 1
    optimizer: Any = None
    lr_scheduler: Any = None
    optimizer_name: str = ""
    optimizer_args: str = ""
    text_cache: Any = None
    latent_cache: Any = None
    started_at: float = field(default_factory=time.time)
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    def precision_autocast(self):
        from library.models.device_setup import autocast

        return autocast(self.device, self.precision)


def step_generator(seed: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    """The generator for every random draw of one micro-batch: a function of (seed, step, micro)."""
    g = torch.Generator(device=device if device.type == "cuda" else "cpu")
    g.manual_seed((seed * 1_000_003 + step * 1_009 + micro) % (2**63 - 1))
    return g
