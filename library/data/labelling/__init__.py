"""Labelling a dataset before training: WD14 tags (onnxruntime), BLIP and GIT captions.

* `image_batches`: the images of a folder, decoded and prepared in DataLoader workers, in batches;
  unreadable files are reported and skipped;
* `caption_files`: caption files beside the images (atomic writes, appending tags) and the
  `--output_path` JSON/JSONL;
* `wd14_tags`: the tag table of a WD14 (`selected_tags.csv`) or tag-mapping (`tag_mapping.json`)
  model and the choice and order of an image's tags from the model's probabilities;
* `wd14_model`: the local model folder, image preprocessing and the onnxruntime session;
* `wd14_tagger`: the tagger's flags and the run over a folder;
* `captioners`, `blip_checkpoint`, `caption_run`: BLIP and GIT from local folders (and sd-scripts'
  BLIP `.pth`), their flags and the captioning run.

Everything reads local files only; a missing model is one line saying what to download and where.
"""
