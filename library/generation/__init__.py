"""Generation: images from prompts, for gen_img.py / sdxl_gen_img.py and for samples during training.

* `engine`: diffusers' pipelines (txt2img, img2img, inpaint, highres fix) on the models we hold;
* `samplers`: sd-scripts' sampler names → diffusers schedulers;
* `prompt_options`: prompt files and their per-prompt options (`--n`, `--w`, `--s`, ...) — placed here
  rather than in `text` because they choose samplers and read PNG info;
* `png_info`: generation settings in PNG text chunks, output names;
* `args`, `loading`, `run`: the generators' flags, loading models/networks/embeddings, the run;
* `sampling`: sample images during training, with the models being trained.

May import `library.models` and `library.text`; not `data` (its sibling) nor anything above.
"""
