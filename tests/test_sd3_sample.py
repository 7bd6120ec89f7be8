"""Sampling SD3 during training: StableDiffusion3Pipeline over the live modules, flow-match Euler, sd-scripts
prompt options; equal to calling the pipeline directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from library.errors import ConfigError
from library.training.sample import SamplePrompt, generate, make_scheduler


@pytest.fixture(scope="module")
def tiny():
    from library.models.tiny import build_tiny

    model = build_tiny("sd3", seed=2)
    model.extra["t5xxl_max_token_length"] = 16
    return model


def test_generate_matches_the_pipeline(tiny):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    prompt = SamplePrompt(prompt="a red photo", negative="blue", width=64, height=64, steps=3, cfg_scale=4.0, seed=7)
    (image,) = generate(tiny, [prompt], sampler="euler", base_seed=0)
    tes, toks = tiny.text_encoders, tiny.tokenizers
    pipe = StableDiffusion3Pipeline(
        transformer=tiny.unet, scheduler=FlowMatchEulerDiscreteScheduler.from_config(tiny.scheduler_config),
        vae=tiny.vae, text_encoder=tes[0], tokenizer=toks[0], text_encoder_2=tes[1], tokenizer_2=toks[1],
        text_encoder_3=tes[2], tokenizer_3=toks[2])
    ref = pipe(prompt="a red photo", negative_prompt="blue", width=64, height=64, num_inference_steps=3,
               guidance_scale=4.0, generator=torch.Generator().manual_seed(7), max_sequence_length=16).images[0]
    assert image.size == (64, 64)
    assert np.array_equal(np.asarray(image), np.asarray(ref))


def test_ddpm_samplers_do_not_apply_to_sd3(tiny):
    assert type(make_scheduler("euler", tiny.scheduler_config)).__name__ == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(ConfigError, match="SD3 .* samples with 'euler'"):
        make_scheduler("ddim", tiny.scheduler_config)
