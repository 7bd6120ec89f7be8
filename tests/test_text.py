"""Text conditioning and the UNet call match the diffusers pipelines exactly (library/models/text.py)."""

import pytest
import torch

from library.models.text import TextCond, encode_text, sdxl_time_ids, tokenize, unet_forward

CAPTIONS = ["a photo of a cat", "an oil painting of a lighthouse at dusk, dramatic sky"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread


@pytest.fixture(scope="module")
def models(tiny_models):
    return {f: tiny_models(f) for f in ("sd1", "sd2", "sdxl")}


def _sd_pipeline(model):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=model.unet,
        scheduler=DDPMScheduler.from_config(model.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl_pipeline(model):
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=model.vae, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1],
        tokenizer=model.tokenizers[0], tokenizer_2=model.tokenizers[1], unet=model.unet,
        scheduler=DDPMScheduler.from_config(model.scheduler_config),
    )


def test_tokenize_pads_and_truncates_like_each_family(models):
    sd1, = tokenize(models["sd1"], ["a photo of a cat"])
    assert sd1.shape == (1, 77) and sd1.dtype == torch.long
    assert sd1[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert set(sd1[0, 7:].tolist()) == {49407}  # SD1 pads with <|endoftext|>
    sd2, = tokenize(models["sd2"], ["a photo of a cat"])
    assert sd2[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert set(sd2[0, 7:].tolist()) == {0}  # OpenCLIP pads with "!" (id 0)
    xl1, xl2 = tokenize(models["sdxl"], ["a photo of a cat"])
    assert torch.equal(xl1, sd1) and torch.equal(xl2, sd2)
    long_ids, = tokenize(models["sd1"], ["cat " * 100])
    assert long_ids.shape == (1, 77)
    assert long_ids[0, 0] == 49406 and long_ids[0, -1] == 49407 and set(long_ids[0, 1:-1].tolist()) == {2368}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_encode_text_equals_stable_diffusion_pipeline(models, family):
    model = models[family]
    pipe = _sd_pipeline(model)
    with torch.no_grad():
        expected, _ = pipe.encode_prompt(CAPTIONS, "cpu", 1, do_classifier_free_guidance=False)
        cond = encode_text(model, tokenize(model, CAPTIONS))
    assert cond.pooled is None
    assert cond.hidden.shape == (2, 77, model.unet.config.cross_attention_dim)
    assert torch.equal(cond.hidden, expected)


def test_clip_skip_is_an_earlier_layer_through_the_final_layer_norm(models):
    model = models["sd1"]
    te = model.text_encoders[0]
    ids = tokenize(model, CAPTIONS)
    with torch.no_grad():
        last = encode_text(model, ids, clip_skip=1).hidden
        skip2 = encode_text(model, ids, clip_skip=2).hidden
        states = te(ids[0], output_hidden_states=True).hidden_states
        # diffusers' clip_skip counts skipped layers (ours - 1); its SD pipeline reaches the norm through
        # `.text_model`, which transformers 5's CLIPTextModel no longer has, so the reference is computed here.
        expected = torch.nn.functional.layer_norm(
            states[-2], (te.config.hidden_size,), te.final_layer_norm.weight, te.final_layer_norm.bias,
            te.config.layer_norm_eps,
        )
    assert torch.equal(skip2, expected)
    assert not torch.allclose(skip2, last)
    with pytest.raises(ValueError):
        encode_text(model, ids, clip_skip=0)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_encode_text_equals_sdxl_pipeline(models, clip_skip):
    model = models["sdxl"]
    pipe = _sdxl_pipeline(model)
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(
            CAPTIONS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False,
            clip_skip=None if clip_skip == 1 else clip_skip - 1,
        )
        cond = encode_text(model, tokenize(model, CAPTIONS), clip_skip=clip_skip)
    assert cond.hidden.shape == (2, 77, 48 + 96) and cond.pooled.shape == (2, 96)
    assert torch.equal(cond.hidden, hidden)
    assert torch.equal(cond.pooled, pooled)


def test_sdxl_time_ids_are_height_width_rows():
    ids = sdxl_time_ids([(768, 1024), (1024, 512)], [(0, 32), (16, 0)], [(832, 1216), (1024, 1024)])
    assert ids.dtype == torch.float32
    assert ids.tolist() == [[768, 1024, 0, 32, 832, 1216], [1024, 512, 16, 0, 1024, 1024]]
    with pytest.raises(ValueError):
        sdxl_time_ids([(1, 1)], [], [(1, 1)])


def test_unet_forward_sdxl_matches_direct_call_and_pipeline_time_ids(models):
    model = models["sdxl"]
    pipe = _sdxl_pipeline(model)
    # The pipeline's own time ids for a 64x48 (h x w) image cropped at (4, 8), generated at 64x48.
    expected_ids = pipe._get_add_time_ids((64, 48), (4, 8), (64, 48), dtype=torch.float32,
                                          text_encoder_projection_dim=96)
    ids = sdxl_time_ids([(64, 48)], [(4, 8)], [(64, 48)])
    assert torch.equal(ids, expected_ids)

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 6, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        cond = encode_text(model, tokenize(model, CAPTIONS))
        out = unet_forward(model, latents, t, cond, ids.repeat(2, 1))
        direct = model.unet(latents, t, encoder_hidden_states=cond.hidden,
                            added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": ids.repeat(2, 1)}).sample
        other = unet_forward(model, latents, t, cond, sdxl_time_ids([(32, 32)] * 2, [(0, 0)] * 2, [(64, 48)] * 2))
    assert out.shape == latents.shape
    assert torch.equal(out, direct)
    assert not torch.allclose(out, other)  # the size conditioning reaches the UNet
    with pytest.raises(ValueError):
        unet_forward(model, latents, t, cond)


def test_unet_forward_sd_casts_conditioning_and_refuses_time_ids(models):
    model = models["sd1"]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    with torch.no_grad():
        cond = encode_text(model, tokenize(model, CAPTIONS[:1]))
        out = unet_forward(model, latents, t, cond)
        via_bf16 = unet_forward(model, latents, t, cond.to(dtype=torch.bfloat16))
        direct = model.unet(latents, t, encoder_hidden_states=cond.hidden).sample
    assert torch.equal(out, direct)
    assert via_bf16.dtype == torch.float32 and torch.allclose(via_bf16, out, atol=0.05)
    with pytest.raises(ValueError):
        unet_forward(model, latents, t, cond, torch.zeros(1, 6))
    assert isinstance(cond, TextCond)
