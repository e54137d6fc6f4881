"""Text: the offline CLIP tokenizer, captions and prompts into U-Net conditioning, prompt syntax.

* `tokenizer`: CLIP tokenizers built from the BPE file open_clip ships (no hub);
* `encoding`: long prompts (75/150/225 tokens), clip_skip, weighted prompts → conditioning tensors;
* `prompt_syntax`: `{a|b}` wildcards and `(x:1.2)` weights, shared by captions and generation.

The bottom layer: imports only `library.errors`. The per-fetch caption transforms (shuffle, dropout,
keep_tokens) are the dataset's and live in `library.data.captions`; the per-prompt options of sample
and generation prompts (`--n`, `--w`, ...) are generation's, in `library.generation.prompt_options`.
"""
