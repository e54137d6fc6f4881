"""Helpers shared by the LoRA tool tests: random LoRA files on tiny models, running a tool's main in-process
the way its script does (one-line errors, exit status 2), and diffusers pipelines of our tiny models."""

import torch


def random_lora(models, path, seed, dim=4, alpha=2.0, conv_dim=None, module="networks.lora", keep=None, **kwargs):
    """A LoRA file for `models` with random factors (what a trained file looks like, numerically)."""
    import importlib

    args = {k: str(v) for k, v in kwargs.items()}
    if conv_dim:
        args.update(conv_dim=str(conv_dim), conv_alpha="1")
    network = importlib.import_module(module).create_network(1.0, dim, alpha, models.vae, models.text_encoders,
                                                             models.unet, **args)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    state = network.state_dict_for_save()
    if keep is not None:
        state = {k: v for k, v in state.items() if keep(k)}
    from networks.lora_files import save_lora

    save_lora(str(path), state, {"ss_network_module": module})
    return str(path)


def run_tool(main, *argv):
    """Exit status of `main(argv)` run as its script runs it (library.cli.run)."""
    from library.cli import run

    try:
        run(lambda: main([str(a) for a in argv]))
    except SystemExit as e:
        return e.code
    return 0


def diffusers_pipeline(models):
    """A diffusers pipeline holding our loaded tiny models (for load_lora_weights + fuse_lora)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from library.text.tokenizer import load_tokenizers

    tokenizers = load_tokenizers(models.family)
    if models.family.is_sdxl:
        return StableDiffusionXLPipeline(vae=models.vae, text_encoder=models.text_encoders[0],
                                         text_encoder_2=models.text_encoders[1], tokenizer=tokenizers[0],
                                         tokenizer_2=tokenizers[1], unet=models.unet,
                                         scheduler=EulerDiscreteScheduler())
    return StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoders[0], tokenizer=tokenizers[0],
                                   unet=models.unet, scheduler=EulerDiscreteScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def fuse_with_diffusers(models, files_and_scales):
    """The models' weights after diffusers' load_lora_weights + fuse_lora of each (file, scale), in order."""
    pipe = diffusers_pipeline(models)
    for file, scale in files_and_scales:
        pipe.load_lora_weights(file)
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()
    return pipe


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
