"""Training: one loop for every trainer, parameterised by a model family and a task.

* `trainer`: the loop (`train`), top to bottom; `run`: what a run holds and the `Task` hooks;
  `step_loss`: the loss of one micro-batch; `epoch_jobs`: which batches a step trains on;
* tasks: `task_network` (LoRA and any `--network_module`), `task_full` (DreamBooth, fine-tuning),
  `task_embedding` (textual inversion);
* flags: `script_parsers` composes every trainer's parser, `train_args`, `ti_args`; `config_file` reads and
  writes `--config_file` TOMLs; `trainer_options` puts every trainer option on a tool's parser;
* math: `noise`, `losses`, `train_math`; `optimizers`, `lr_schedulers`, `ema`, `grad_sync`;
* runs: `train_state` (resume), `save_policy`, `validation`, `train_logging`;
* files: `lora_metadata`, `network_metadata` (the `ss_*` metadata of network files).

The top layer of `library`: may import every package below it. Entry scripts, `networks/`, `tools/`
and `finetune/` sit above it.
"""
