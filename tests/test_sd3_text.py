"""SD3 text conditioning equals diffusers' StableDiffusion3Pipeline.encode_prompt; the denoiser call; no-T5 path."""

from __future__ import annotations

import pytest
import torch

from library.models.text import encode_text, tokenize, unet_forward


@pytest.fixture(scope="module")
def tiny():
    from library.models.tiny import build_tiny

    model = build_tiny("sd3", seed=1)
    model.extra["t5xxl_max_token_length"] = 32
    return model


def _pipeline(model, with_t5=True):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tes, toks = model.text_encoders, model.tokenizers
    return StableDiffusion3Pipeline(
        transformer=model.unet, scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config),
        vae=model.vae, text_encoder=tes[0], tokenizer=toks[0], text_encoder_2=tes[1], tokenizer_2=toks[1],
        text_encoder_3=tes[2] if with_t5 else None, tokenizer_3=toks[2] if with_t5 else None,
    )


CAPTIONS = ["a red photo of a cat", "blue"]


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_encode_text_equals_the_pipeline(tiny, clip_skip):
    with torch.no_grad():
        cond = encode_text(tiny, tokenize(tiny, CAPTIONS), clip_skip=clip_skip)
        ref, _, ref_pooled, _ = _pipeline(tiny).encode_prompt(
            CAPTIONS, CAPTIONS, CAPTIONS, do_classifier_free_guidance=False, max_sequence_length=32,
            clip_skip=None if clip_skip == 1 else clip_skip - 1)
    assert cond.hidden.shape == (2, 77 + 32, 96) and cond.pooled.shape == (2, 80)
    assert torch.equal(cond.hidden, ref) and torch.equal(cond.pooled, ref_pooled)


def test_without_t5_its_tokens_are_zeros_as_the_pipeline(tiny):
    import copy

    no_t5 = copy.copy(tiny)
    no_t5.text_encoders, no_t5.tokenizers = tiny.text_encoders[:2], tiny.tokenizers[:2]
    with torch.no_grad():
        cond = encode_text(no_t5, tokenize(no_t5, CAPTIONS))
        ref, _, ref_pooled, _ = _pipeline(tiny, with_t5=False).encode_prompt(
            CAPTIONS, CAPTIONS, CAPTIONS, do_classifier_free_guidance=False, max_sequence_length=32)
    assert torch.equal(cond.hidden, ref) and torch.equal(cond.pooled, ref_pooled)
    assert not cond.hidden[:, 77:].any() and cond.hidden[:, :77, :80].abs().sum() > 0


def test_denoiser_call_is_the_transformers(tiny):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 8, 8, generator=g)
    t = torch.tensor([250, 900])
    with torch.no_grad():
        cond = encode_text(tiny, tokenize(tiny, CAPTIONS))
        ours = unet_forward(tiny, latents, t, cond)
        ref = tiny.unet(hidden_states=latents, timestep=t.float(), encoder_hidden_states=cond.hidden,
                        pooled_projections=cond.pooled).sample
    assert ours.shape == latents.shape and torch.equal(ours, ref)
    with pytest.raises(ValueError, match="time_ids are SDXL-only"):
        unet_forward(tiny, latents, t, cond, torch.zeros(2, 6))
