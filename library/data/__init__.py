"""Data: from folders, TOML and metadata JSON to the batches a training step reads.

* `flags`, `config`, `schema`: the dataset flags and `--dataset_config` TOML, resolved and checked;
* `sources`, `image_files`, `metadata_json`: which images and captions a subset holds, reading them;
* `scan`, `report`, `check`: the whole-dataset check before any model loads (`--dataset_check`);
* `bucketing`, `image_transforms`: aspect-ratio buckets, resize/crop/flip;
* `captions`: caption transforms at every fetch (shuffle, dropout, keep_tokens, ...);
* `train_dataset`: the training dataset and an epoch's batches; `debug_dataset`: `--debug_dataset`, those
  batches written out as images and captions;
* `labelling/`: writing the tags and captions before training (WD14 tagger, BLIP, GIT).

May import `library.models` and `library.text`; not `generation` (its sibling) nor anything above.
Which batches a step trains on, with several processes and accumulation, is the loop's
(`library.training.epoch_jobs`), as it depends on the caches.
"""
