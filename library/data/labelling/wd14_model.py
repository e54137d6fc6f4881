"""A tagger model from its local folder: finding the files, preparing images, running onnxruntime.

Folder (sd-scripts' naming): `--repo_id owner/name` → `<model_dir>/owner_name/` holding `model.onnx`
and `selected_tags.csv` (WD14 v2/v3); `owner/name/sub` → `<model_dir>/owner_name/sub/` holding
`model_optimized.onnx` and `tag_mapping.json` (tag-mapping models such as cl_tagger). A `--model_dir`
that itself holds the files is used as is. Nothing is downloaded: a missing folder or file is one
line saying which files to download and where to put them.

Image preparation (the models' training convention, spec §11.3): transparent pixels composited onto
white, RGB → BGR, padded to a square with white (left/top get the smaller half), resized to the
model's side (448 for every published model): area averaging when shrinking, Lanczos when
enlarging. WD14 models take NHWC float32 0..255; tag-mapping models NCHW float32 x/127.5 - 1 and
return logits. EXIF orientation is applied (the training loader does too). It runs in DataLoader
workers as `PrepareForTagger`, which is picklable.

onnxruntime runs with the CUDA provider when that build is installed and sees a GPU, ROCm likewise,
else the CPU. A model with a fixed batch size runs at that size (the last batch is padded).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from importlib import metadata

import numpy as np
from PIL import Image

from library.data.image_files import load_image_rgb
from library.data.labelling.wd14_tags import MAPPING, WD14, TagTable, check_outputs, read_selected_tags, read_tag_mapping
from library.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 448
_FILES = {WD14: ("model.onnx", "selected_tags.csv"), MAPPING: ("model_optimized.onnx", "tag_mapping.json")}
_KERAS_FILES = ("saved_model.pb", "keras_metadata.pb")


@dataclass(frozen=True)
class ModelFiles:
    layout: str
    folder: str
    model: str
    tags: str


def find_model_files(model_dir: str, repo_id: str) -> ModelFiles:
    """The model and tag files for `--repo_id` under `--model_dir`; UserError naming what to download."""
    parts = [p for p in repo_id.strip("/").split("/") if p]
    if len(parts) < 2:
        raise UserError(f"--repo_id {repo_id!r} must be owner/name (WD14) or owner/name/folder (tag-mapping models)")
    layout = WD14 if len(parts) == 2 else MAPPING
    model_name, tags_name = _FILES[layout]
    implied = os.path.join(model_dir, f"{parts[0]}_{parts[1]}", *parts[2:])
    for folder in (implied, model_dir):
        if os.path.isfile(os.path.join(folder, model_name)) and os.path.isfile(os.path.join(folder, tags_name)):
            return ModelFiles(layout, folder, os.path.join(folder, model_name), os.path.join(folder, tags_name))
    hub_files = " ".join("/".join(parts[2:] + [name]) for name in (model_name, tags_name))
    root = os.path.join(model_dir, f"{parts[0]}_{parts[1]}")
    get = f"`hf download {parts[0]}/{parts[1]} {hub_files} --local-dir {root}`"
    if layout == WD14 and any(os.path.isfile(os.path.join(implied, f)) for f in _KERAS_FILES):
        raise UserError(f"{implied} holds the TensorFlow model; the tagger runs the ONNX one: put model.onnx and "
                        f"selected_tags.csv there ({get}; nothing is downloaded at run time)")
    missing = [name for name in (model_name, tags_name) if not os.path.isfile(os.path.join(implied, name))]
    raise UserError(f"tagger model not found: {implied} lacks {' and '.join(missing)}; download them with {get} "
                    "(nothing is downloaded at run time), or point --model_dir at the folder that holds them")


def read_tag_table(files: ModelFiles) -> TagTable:
    return read_selected_tags(files.tags) if files.layout == WD14 else read_tag_mapping(files.tags)


# --- images -------------------------------------------------------------------------------------


def prepare_image(path: str, size: int) -> tuple:
    """(uint8 size×size×3 BGR array, original (w, h)) as the tagger models expect; UserError if unreadable."""
    rgb = load_image_rgb(path, background=(255, 255, 255))
    h, w = rgb.shape[:2]
    side = max(w, h)
    if (w, h) != (side, side):
        left, top = (side - w) // 2, (side - h) // 2
        square = np.full((side, side, 3), 255, dtype=np.uint8)
        square[top:top + h, left:left + w] = rgb
        rgb = square
    if side != size:
        # cv2.INTER_AREA (sd-scripts) and PIL's BOX both average the covered source area when shrinking
        method = Image.Resampling.BOX if side > size else Image.Resampling.LANCZOS
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), method))
    return np.ascontiguousarray(rgb[:, :, ::-1]), (w, h)


class PrepareForTagger:
    """Picklable `path → (array, (w, h))` for DataLoader workers."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, path: str):
        return prepare_image(path, self.size)


# --- onnxruntime --------------------------------------------------------------------------------


def _warn_two_builds() -> None:
    installed = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            installed.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    if len(installed) > 1:
        logger.warning(f"both {' and '.join(installed)} are installed; they overwrite each other's files. Keep one: "
                       "`pip uninstall -y onnxruntime onnxruntime-gpu` then install onnxruntime-gpu (CUDA) or onnxruntime")


def choose_providers(available: list) -> list:
    """CUDA, else ROCm, else CPU; the CPU stays listed as the fallback for operators a GPU lacks."""
    for gpu in ("CUDAExecutionProvider", "ROCMExecutionProvider"):
        if gpu in available:
            return [gpu, "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class TaggerModel:
    """An onnxruntime session over a tagger model; `run` maps prepared uint8 images to scores."""

    def __init__(self, files: ModelFiles, batch_size: int):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("onnxruntime is not installed: `pip install onnxruntime` (CPU) or onnxruntime-gpu (CUDA), "
                            "not both") from None
        _warn_two_builds()
        self.layout = files.layout
        providers = choose_providers(ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(files.model, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise UserError(f"cannot load {files.model}: {e}".splitlines()[0]) from None
        logger.info(f"onnxruntime {ort.__version__} on {self.session.get_providers()[0]}")
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        shape = list(first.shape)
        if len(shape) != 4:
            raise UserError(f"{files.model}: the model input {first.name} has shape {shape}; a tagger takes "
                            "images (4 dimensions)")
        spatial = shape[1:3] if self.layout == WD14 else shape[2:4]
        self.image_size = spatial[0] if isinstance(spatial[0], int) and spatial[0] > 0 else DEFAULT_IMAGE_SIZE
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.batch_size = batch_size
        if self.fixed_batch is not None and self.fixed_batch != batch_size:
            logger.warning(f"--batch_size {batch_size}: the model takes batches of exactly {self.fixed_batch}; "
                           f"using {self.fixed_batch}")
            self.batch_size = self.fixed_batch
        self.run_seconds = 0.0  # time spent inside onnxruntime's run, for the benchmark

    def check_tags(self, table: TagTable) -> None:
        outputs = self.session.get_outputs()[0].shape
        if len(outputs) == 2 and isinstance(outputs[1], int):
            check_outputs(table, outputs[1])

    def run(self, images: list) -> np.ndarray:
        """Scores (probabilities) of each prepared image: [len(images), n_outputs] float32."""
        batch = np.stack(images)
        if self.layout == MAPPING:
            batch = batch.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
        else:
            batch = batch.astype(np.float32)
        n = len(images)
        if self.fixed_batch is not None and n < self.fixed_batch:
            pad = np.zeros((self.fixed_batch - n,) + batch.shape[1:], dtype=np.float32)
            batch = np.concatenate([batch, pad])
        start = time.perf_counter()
        scores = self.session.run(None, {self.input_name: batch})[0][:n]
        self.run_seconds += time.perf_counter() - start
        scores = np.asarray(scores, dtype=np.float32)
        if self.layout == MAPPING:
            scores = 1.0 / (1.0 + np.exp(-scores))
        return scores
