"""End to end: train_lora.py on the tiny models; the LoRA file loads in diffusers and reproduces the trained model."""

import numpy as np
import pytest
import torch

from library.config.core import load_config
from library.models.tiny import resolve_model_ref
from library.training.run import run_training
from library.methods.lora import LoraRunConfig, make_method


def lora_cfg(tmp_path, model: str, steps: int, **tables) -> LoraRunConfig:
    data = {
        "model": {"pretrained_model_name_or_path": model},
        "network": {"network_dim": 4, "network_alpha": 2.0},
        "data": {"train_data_dir": "demo:shapes", "resolution": 64, "batch_size": 2, "min_bucket_reso": 64,
                 "max_bucket_reso": 128, "num_workers": 0, "cache_latents": True},
        "train": {"max_train_steps": steps, "seed": 3},
        "optimizer": {"learning_rate": 5e-3},
        "save": {"output_dir": str(tmp_path / "out"), "output_name": "lora", "save_precision": "fp32"},
        "log": {"progress_bar": False, "log_with": "none"},
    }
    for table, values in tables.items():
        data.setdefault(table, {}).update(values)
    return load_config(LoraRunConfig, data, source="test")


def _pipeline(family: str, folder):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kwargs = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    return cls.from_pretrained(str(folder), **kwargs)


@pytest.mark.parametrize("ref,family,network", [
    ("tiny:sd15", "sd1", {"conv_dim": 4, "conv_alpha": 2.0}),  # LoCon: linear + 3x3 conv adapters
    ("tiny:sdxl", "sdxl", {}),
])
def test_lora_file_reproduces_trained_model_in_diffusers(tmp_path, ref, family, network):
    from safetensors import safe_open

    from library.models.text import encode_text, tokenize

    cfg = lora_cfg(tmp_path, ref, 3, network=network)
    method = make_method(cfg)
    result = run_training(cfg, method, script="train_lora.py")
    path = result.result_path
    assert path.name == "lora.safetensors" and result.steps == 3
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.split("_")[0] == "lora" and k.split("_")[1] in ("unet", "te", "te1", "te2") for k in keys)
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] in ("sd_v1", "sdxl_base_v1-0")
    assert meta["ss_tag_frequency"].startswith("{") and len(meta["sdtk_config_hash"]) == 16

    folder = resolve_model_ref(ref)
    pipe = _pipeline(family, folder)
    base_unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(path))

    model = result.model
    model.unet.eval()
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 700])
    ids = tokenize(model, ["a red circle", "a blue square"])
    with torch.no_grad():
        ours = encode_text(model, ids)
        kwargs = {}
        if family == "sdxl":
            kwargs["added_cond_kwargs"] = {"text_embeds": ours.pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
        ref_out = model.unet(latents, t, encoder_hidden_states=ours.hidden, **kwargs).sample
        got = pipe.unet(latents, t, encoder_hidden_states=ours.hidden, **kwargs).sample
    assert (got - ref_out).abs().max() <= 1e-5
    assert (got - ref_out).abs().max() < (ref_out - base_output(pipe, latents, t, ours, kwargs)).abs().max()
    # the base weights of our training run are untouched (only adapters trained)
    assert all(torch.equal(v, base_unet[k]) for k, v in _base_weights(model.unet).items() if k in base_unet)


def base_output(pipe, latents, t, cond, kwargs):
    pipe.disable_lora()
    with torch.no_grad():
        out = pipe.unet(latents, t, encoder_hidden_states=cond.hidden, **kwargs).sample
    pipe.enable_lora()
    return out


def _base_weights(unet) -> dict:
    """Base-layer weights of a peft-injected UNet under their original names."""
    out = {}
    for k, v in unet.state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out


def redness(images) -> float:
    a = np.stack([np.asarray(i, dtype=np.float32) for i in images])
    return float((a[..., 0] - a[..., 2]).mean())


@pytest.mark.slow
def test_lora_on_one_colour_concept_shifts_samples(tmp_path):
    """Trained on red shapes whose captions never say 'red', the LoRA makes samples of those captions redder."""
    from library.training.sample import SamplePrompt, generate

    cfg = lora_cfg(tmp_path, "tiny:sd15", 150, data={"train_data_dir": "demo:red", "batch_size": 4},
                   network={"network_dim": 8, "network_alpha": 8.0})
    method = make_method(cfg)
    model = run_training(cfg, method, script="train_lora.py").model
    prompts = [SamplePrompt(f"a {s} on a white background", width=64, height=64, steps=12, cfg_scale=4.0, seed=i)
               for i, s in enumerate(["circle", "square", "triangle"])]
    with_lora = redness(generate(model, prompts, sampler="euler_a", base_seed=0))
    for m in method.network.modules:
        m.layer.enable_adapters(False)
    without = redness(generate(model, prompts, sampler="euler_a", base_seed=0))
    assert with_lora - without > 8, (with_lora, without)  # mean (R - B), 0-255 (measured: 22 -> 36)
