"""Caching: latents and text-encoder outputs computed once, in memory or on disk.

* `keys`, `settings`, `store`: content hashes and fingerprints, the cache flags, the entry files;
* `latent_cache`, `text_encoder_cache`: the two caches;
* `training_caches`: filling them for a training run and releasing encoders no longer needed;
* `tools`: what `tools/cache_latents.py`, `tools/cache_text_encoder_outputs.py` and
  `finetune/prepare_buckets_latents.py` share.

May import `library.data`, `library.models` and `library.text`; nothing above.
"""
