"""The textual-inversion task: learn the vectors of a new token, every model weight frozen.

The token `T` (and `T1` … `T{N-1}` for `--num_vectors_per_token N`) is added to every tokenizer
(SDXL: both) and gets new rows in each text encoder's token table, initialised from `--init_word`
or `--weights`. Captions must contain `T`; with N > 1 it is expanded to `T T1 … T{N-1}` (dataset
`replacements`, and the same for sample prompts), or every caption is replaced by an object/style
template. The saved file is sd-scripts' (`library/models/embedding_files.py`).

Only the new rows can change, by construction: each encoder's token embedding is wrapped in
`NewRowsEmbedding`, which keeps the original table as a frozen module and the new rows as the only
parameter the optimizer sees. sd-scripts instead trains the whole (resized) table and copies the old
rows back after every step; that keeps them equal only as long as nothing else writes to them, needs
optimizer state for the whole table, and lets the old rows' gradients take part in gradient
clipping. Here the old rows are never written at all, so they stay bit-exact whatever the optimizer,
precision or weight decay, and `--max_grad_norm` sees only the new rows' gradient.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence

import torch

from library.models import embedding_files
from library.errors import UserError
from library.training.run import Run, Task
from library.training.train_args import modelspec_flags

logger = logging.getLogger(__name__)

# The "imagenet_templates_small" / "imagenet_style_templates_small" lists of the original Textual
# Inversion code, as sd-scripts uses them (duplicates included: they weight the draw).
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
)
_DROPOUT_FLAGS = ("caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate")
_LISTED_FILES = 5
IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


def token_strings(token: str, count: int) -> List[str]:
    """`T, T1, …, T{N-1}`: the tokens one N-vector embedding adds."""
    return [token] + [f"{token}{i}" for i in range(1, count)]


class NewRowsEmbedding(torch.nn.Module):
    """A token table extended by trainable rows: ids < `base.num_embeddings` read the frozen
    original, the ids after it read `new_rows`. Drop-in for the encoder's `nn.Embedding`."""

    def __init__(self, base: torch.nn.Embedding, new_rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.new_rows = torch.nn.Parameter(new_rows)

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings + self.new_rows.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        """The whole table (old rows, then new ones), for code that reads `.weight`."""
        dtype = getattr(self.base, "compute_dtype", self.base.weight.dtype)  # a half-held table computes wider
        return torch.cat([self.base.weight.to(dtype), self.new_rows.to(dtype)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        first_new = self.base.num_embeddings
        is_new = ids >= first_new
        old = self.base(torch.where(is_new, torch.zeros_like(ids), ids))
        new = self.new_rows.to(old.dtype)[(ids - first_new).clamp(0, self.new_rows.shape[0] - 1)]
        return torch.where(is_new.unsqueeze(-1), new, old)


def add_token_strings(tokenizer, strings: Sequence[str], table_rows: int, flag: str = "--token_string") -> List[int]:
    """Add `strings` to the tokenizer; they must all be new and become ids table_rows, table_rows+1, …"""
    vocab = tokenizer.get_vocab()  # added tokens included
    known = [s for s in strings if s in vocab]
    if known or tokenizer.add_tokens(list(strings)) != len(strings):
        raise UserError(
            f"{flag} {strings[0]!r}: the tokenizer already knows the token(s) {known or list(strings)}; choose a "
            "token string that is not a word or word piece of the vocabulary (e.g. a made-up word)"
        )
    ids = tokenizer.convert_tokens_to_ids(list(strings))
    expected = list(range(table_rows, table_rows + len(strings)))
    if ids != expected or len(tokenizer) != table_rows + len(strings):
        raise UserError(
            f"{flag} {strings[0]!r}: the new tokens got ids {ids}, but the text encoder's token table has {table_rows} "
            f"rows (expected ids {expected}); the model's tokenizer does not match its text encoder"
        )
    return ids


def initial_rows(table: torch.Tensor, init_ids: Sequence[int], count: int) -> torch.Tensor:
    """Row i = table[init_ids[i % len(init_ids)]] (sd-scripts' rule); without ids, the mean row.

    The mean is what transformers' `resize_token_embeddings` gives new rows (its mean-resizing
    adds noise of ~1e-9 times the covariance); taking it exactly keeps runs reproducible.
    """
    with torch.no_grad():
        if init_ids:
            index = torch.tensor([init_ids[i % len(init_ids)] for i in range(count)], device=table.device)
            return table.index_select(0, index).float()
        return table.float().mean(dim=0, keepdim=True).repeat(count, 1)


class EmbeddingTask(Task):
    name = "textual-inversion"

    def __init__(self, sdxl: bool):
        self.sdxl = sdxl
        self._save_as = "pt"
        self.strings: List[str] = []
        self.token_ids: List[List[int]] = []  # per text encoder
        self.embeddings: List[NewRowsEmbedding] = []  # per text encoder
        self.templates: tuple = ()  # caption templates, when --use_object_template / --use_style_template

    @property
    def artifact_ext(self) -> str:  # noqa: D401 - property replaces the class attribute
        return "." + self._save_as

    @property
    def vectors(self) -> List[torch.nn.Parameter]:
        """The trained rows, one [N, C] parameter per text encoder."""
        return [e.new_rows for e in self.embeddings]

    # --- arguments -------------------------------------------------------------------------

    def validate_args(self, args) -> None:
        if not args.token_string or not args.token_string.strip():
            raise UserError("--token_string is required: the made-up word your captions use for the concept "
                            "(e.g. --token_string mychar)")
        if args.num_vectors_per_token < 1:
            raise UserError(f"--num_vectors_per_token {args.num_vectors_per_token}: must be 1 or more")
        if args.use_object_template and args.use_style_template:
            raise UserError("--use_object_template and --use_style_template exclude each other; pick one")
        if not args.output_dir:
            raise UserError("--output_dir is required")
        if getattr(args, "cache_text_encoder_outputs", False) or getattr(args, "cache_text_encoder_outputs_to_disk", False):
            raise UserError("--cache_text_encoder_outputs cannot be used with textual inversion: the text encoders "
                            "must run every step to train the embedding; drop the flag")
        used = [f"--{flag}" for flag in _DROPOUT_FLAGS if getattr(args, flag, 0)]
        if used:
            raise UserError(f"{', '.join(used)}: caption dropout is not supported by textual inversion (a dropped "
                            "caption has no token to train); drop the flag")
        self._save_as = args.save_model_as or "pt"
        self.templates = OBJECT_TEMPLATES if args.use_object_template else STYLE_TEMPLATES if args.use_style_template else ()
        if not args.output_name:
            args.output_name = args.token_string  # sd-scripts' default file name
        self.strings = token_strings(args.token_string, args.num_vectors_per_token)

    def check_data(self, scan, args) -> None:
        """Every training caption (prefix/suffix included, regularisation images excepted) must
        contain the token; found before any model loads or latent is cached."""
        if self.templates:
            return
        token = self.strings[0]
        missing = []
        for dataset in scan.datasets:
            for image in dataset.train + dataset.validation:
                subset = dataset.params.subsets[image.entry.subset_index]
                if subset.is_reg:
                    continue
                text = " ".join(t for t in (subset.caption_prefix, image.entry.caption, subset.caption_suffix) if t)
                if token not in text:
                    missing.append(os.path.basename(image.path))
        if missing:
            listed = ", ".join(missing[:_LISTED_FILES]) + (f" and {len(missing) - _LISTED_FILES} more"
                                                         if len(missing) > _LISTED_FILES else "")
            raise UserError(
                f"{len(missing)} caption(s) do not contain the token string {token!r} (case-sensitive): {listed}; "
                "add it to those captions (or use --caption_prefix), or use --use_object_template / --use_style_template"
            )

    # --- set-up ----------------------------------------------------------------------------

    def setup(self, run: Run) -> None:
        args = run.args
        for i, (tokenizer, encoder) in enumerate(zip(run.tokenizers, run.models.text_encoders)):
            base = encoder.get_input_embeddings()
            init_ids = self._init_ids(tokenizer, args.init_word, warn=i == 0)  # before the new tokens exist
            self.token_ids.append(add_token_strings(tokenizer, self.strings, base.num_embeddings))
            rows = initial_rows(base.weight, init_ids, len(self.strings)).to(run.precision.train_dtype)
            embedding = NewRowsEmbedding(base, rows)
            encoder.set_input_embeddings(embedding)
            encoder.config.vocab_size = embedding.num_embeddings
            self.embeddings.append(embedding)
        if args.weights:
            self._load_weights(args.weights)
        logger.info("textual inversion: tokens %s (ids %s), initialised from %s", self.strings, self.token_ids[0],
                    args.weights or (f"--init_word {args.init_word!r}" if args.init_word else "the mean embedding"))

    def _init_ids(self, tokenizer, init_word: Optional[str], warn: bool) -> List[int]:
        if init_word is None:
            return []
        ids = tokenizer(init_word, add_special_tokens=False).input_ids
        if not ids:
            raise UserError(f"--init_word {init_word!r} gives no tokens; give a real word or leave it out")
        if warn and len(ids) != len(self.strings):
            logger.warning("--init_word %r is %d token(s) but --num_vectors_per_token is %d: its tokens are %s",
                           init_word, len(ids), len(self.strings),
                           "repeated" if len(ids) < len(self.strings) else "truncated")
        return ids

    def _load_weights(self, path: str) -> None:
        widths = [e.embedding_dim for e in self.embeddings]
        loaded = embedding_files.load_embedding(path, self.sdxl, widths)
        for i, (vectors, embedding) in enumerate(zip(loaded, self.embeddings)):
            if vectors is None:
                logger.warning("--weights %s: no vectors for text encoder %d; it starts from the initial ones", path, i + 1)
                continue
            if vectors.shape[0] != len(self.strings):
                raise UserError(f"--weights {path}: holds {vectors.shape[0]} vector(s) per token, but "
                                f"--num_vectors_per_token is {len(self.strings)}; make them equal")
            with torch.no_grad():
                embedding.new_rows.copy_(vectors)

    def replacements(self) -> Dict[str, object]:
        """Dataset caption replacements: a template for every caption, or `T` → `T T1 …` (N > 1)."""
        expanded = " ".join(self.strings)
        if self.templates:
            return {"": [t.format(expanded) for t in self.templates]}
        return {self.strings[0]: expanded} if len(self.strings) > 1 else {}

    def configure_dataset(self, run: Run) -> None:
        for dataset in (run.dataset, run.extra.get("validation_dataset")):
            if dataset is not None:
                dataset.replacements = self.replacements() or None

    def param_groups(self, run: Run) -> tuple:
        return [{"params": self.vectors, "lr": run.args.learning_rate}], ["textual_inversion"]

    # --- the loop's hooks ------------------------------------------------------------------

    def trains_text_encoder(self, index: int) -> bool:
        return True  # the encoders run with grad so the new rows get one; their weights stay frozen

    def trains_unet(self) -> bool:
        return False

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        return embedding_files.embedding_dict([v.detach() for v in self.vectors], self.sdxl)

    def load_trainable_state(self, tensors: Dict[str, torch.Tensor]) -> None:
        expected = embedding_files.embedding_dict(self.vectors, self.sdxl)
        if set(tensors) != set(expected):
            raise UserError(f"--resume: the state holds {sorted(tensors)}, not a textual-inversion state with "
                            f"{sorted(expected)}; resume from a state saved by this trainer")
        for key, param in expected.items():
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise UserError(f"--resume: the state's {key} has shape {list(tensors[key].shape)}, this run trains "
                                f"{list(param.shape)}; use the same --num_vectors_per_token and model")
            with torch.no_grad():
                param.copy_(tensors[key])

    def prompt_replacements(self) -> Optional[dict]:
        return {self.strings[0]: " ".join(self.strings)} if len(self.strings) > 1 else None

    def save(self, run: Run, path: str, epoch: int, step: int, final: bool) -> None:
        from library.models.saving import PRECISIONS

        for key, tensor in embedding_files.embedding_dict(self.vectors, self.sdxl).items():
            if not torch.isfinite(tensor).all():
                raise UserError(f"step {step}: the embedding's {key} vectors are not finite; nothing was saved. "
                                "Lower --learning_rate")
        args = run.args
        dtype = PRECISIONS.get(args.save_precision) if args.save_precision else None
        metadata = self._metadata(run) if path.endswith(".safetensors") else None
        embedding_files.save_embedding(path, self.vectors, self.sdxl, metadata=metadata, dtype=dtype)

    def _metadata(self, run: Run) -> Dict[str, str]:
        """modelspec keys only, as sd-scripts writes for embeddings (no ss_* training keys)."""
        from library.models import modelspec

        args = run.args
        datasets = run.dataset.scan.datasets
        resolution = tuple(datasets[0].params.resolution) if datasets and datasets[0].params.resolution else None
        extra = modelspec_flags(args)
        timesteps = (args.min_timestep, args.max_timestep)
        metadata = modelspec.build_metadata(
            run.family, run.models.v_parameterization, args.metadata_title or args.output_name,
            kind="textual-inversion", resolution=resolution,
            timestep_range=timesteps if any(t is not None for t in timesteps) else None,
            clip_skip=args.clip_skip, extra=extra,
        )
        # sd-scripts names Stability AI's implementation for every embedding, SD1/SD2 included
        # (fixture ti_sd15_2vec); modelspec.build_metadata says "diffusers" for SD1/SD2 ones.
        metadata["modelspec.implementation"] = IMPLEMENTATION
        return metadata
