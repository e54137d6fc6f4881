"""Shared code of the sdtrain scripts, in packages that import one way only (docs/architecture.md):

    text                 tokenizer, long-prompt encoding, prompt syntax
    models               families, checkpoint formats and conversion, loading and saving (may use text)
    data, generation     the training dataset / image generation (use models and text; not each other)
    caching              latent and text-encoder-output caches (use data, models, text)
    training             the loop, its tasks, math, optimizers and files (use everything below)

`errors` and `cli` are the small helpers every layer and entry script share.
"""
