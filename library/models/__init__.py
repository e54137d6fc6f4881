"""Models: the three families and every file form of their weights.

* `families`, `detect`: SD1/SD2/SDXL descriptions and telling them apart from the weights;
* `unet_convert`, `vae_convert`, `clip_convert`: single-file (original) ⇄ diffusers key layouts;
* `loading`, `saving`, `safetensors_io`, `checkpoint_io`, `modelspec`: reading and writing checkpoints
  and diffusers folders (`weights_only` pickles, modelspec metadata);
* `atomic_writes`: files and folders written under a temporary name and renamed into place, and the
  clean-up of what a killed writer left;
* `text_encoder_view`: the text encoders as `--network_module` plugins expect them (`text_model.`);
* `network_deltas`, `network_targets`, `network_merge`: weight changes of LoRA/LyCORIS files (the
  plain formulas), the layer each module name addresses, merging them into models or a checkpoint
  streamed tensor by tensor; `checkpoint_sum`: weighted sums of checkpoints, streamed;
* `embedding_files`: textual-inversion embedding files, which ride on a model's text encoders
  (here, not in `training`, because the generators read them too);
* `random_models`: seeded random models of the real layouts (tiny or full size);
* `frozen_weights`, `fp8_weights`, `cpu_attention`, `device_setup`: how frozen weights are held (in
  half precision, or in fp8 with `--fp8_base`), attention on the CPU, devices and precision.

May import `library.text` (saving a diffusers folder writes its tokenizer) and nothing above.
"""
