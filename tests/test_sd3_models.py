"""SD3 / SD3.5: bundled configs (full size, on the meta device), `tiny:sd3`, folder loading and the 16-channel codec."""

from __future__ import annotations

import json

import pytest
import torch

from library.models.configs import bundled_config_dir

# Parameter counts of the released models, built from the bundled configs (meta device, no memory). The MMDiT
# figures match the model cards' sizes (SD3 Medium "2B", SD3.5 Medium 2.5B incl. ..., SD3.5 Large "8.1B"); the
# encoders are CLIP ViT-L/14 and OpenCLIP bigG/14 text towers with projection and T5 v1.1 XXL's encoder.
TRANSFORMER_PARAMS = {"sd3_medium": 2_028_328_000, "sd35_medium": 2_243_171_520, "sd35_large": 8_056_627_520}
VAE_PARAMS, CLIP_L_PARAMS, CLIP_G_PARAMS, T5_PARAMS = 83_819_683, 123_650_304, 694_659_840, 4_762_310_656


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(TRANSFORMER_PARAMS))
def test_bundled_configs_build_the_released_sizes(name):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    d = bundled_config_dir(name)
    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(d / "transformer"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(d / "vae"))
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(d / "text_encoder"))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(d / "text_encoder_2"))
        t5 = T5EncoderModel(T5Config.from_pretrained(d / "text_encoder_3"))
    assert _count(transformer) == TRANSFORMER_PARAMS[name]
    assert (_count(vae), _count(clip_l), _count(clip_g), _count(t5)) == (
        VAE_PARAMS, CLIP_L_PARAMS, CLIP_G_PARAMS, T5_PARAMS)
    assert vae.config.latent_channels == 16 and vae.quant_conv is None and vae.post_quant_conv is None
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (1.5305, 0.0609)
    sched = json.loads((d / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sched["shift"] == 3.0


def test_variant_rule_matches_the_bundled_configs():
    from library.models.families import FAMILIES, SD3_VARIANTS, sd3_variant

    for name in SD3_VARIANTS:
        cfg = json.loads((bundled_config_dir(name) / "transformer" / "config.json").read_text())
        assert sd3_variant(cfg) == name
    assert [v.ss_base_model_version for v in SD3_VARIANTS.values()] == ["medium", "5-medium", "5-large"]
    assert FAMILIES["sd3"].denoiser == "transformer"
    for name in SD3_VARIANTS:  # the facts the family table does not repeat: the bundled configs hold them
        folder = bundled_config_dir(name)
        vae = json.loads((folder / "vae" / "config.json").read_text())
        assert (vae["latent_channels"], vae["shift_factor"], vae["scaling_factor"]) == (16, 0.0609, 1.5305)
        assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0
        widths = [json.loads((folder / te / "config.json").read_text())[key] for te, key in (
            ("text_encoder", "hidden_size"), ("text_encoder_2", "hidden_size"), ("text_encoder_3", "d_model"))]
        assert widths == [768, 1280, 4096]


def test_tiny_sd3_is_seeded_and_leaves_the_global_rng(tiny_sd3):
    from library.models.tiny import build_tiny

    state = torch.get_rng_state()
    again, other = build_tiny("sd3"), build_tiny("sd3", seed=1)
    assert torch.equal(state, torch.get_rng_state())
    a, b, c = (m.unet.state_dict() for m in (tiny_sd3, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["context_embedder.weight"], c["context_embedder.weight"])
    assert tiny_sd3.family == "sd3" and tiny_sd3.prediction_type == "flow"
    assert [type(t).__name__ for t in tiny_sd3.text_encoders] == [
        "CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"]
    cfg = tiny_sd3.unet.config
    assert cfg.qk_norm == "rms_norm" and list(cfg.dual_attention_layers) == [0] and cfg.in_channels == 16


def test_tiny_t5_tokenizer_is_offline_and_t5_shaped():
    from library.models.sd3.tiny import tiny_t5_tokenizer

    tok = tiny_t5_tokenizer()
    ids = tok(["a red photo", "Blue"], padding="max_length", max_length=6, truncation=True).input_ids
    # <pad> 0, </s> 1 as T5; whole words are single pieces, input lower-cased.
    vocab = tok.get_vocab()
    assert ids[0] == [vocab["\u2581a"], vocab["\u2581red"], vocab["\u2581photo"], 1, 0, 0]
    assert ids[1] == [vocab["\u2581blue"], 1, 0, 0, 0, 0]


def test_tiny_sd3_folder_round_trip_and_reference(tmp_path, tiny_sd3):
    from library.config.model import ModelConfig
    from library.models.load import load_model
    from library.models.save import save_diffusers

    folder = save_diffusers(tiny_sd3, tmp_path / "sd3", dtype=torch.float32)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["tokenizer_3"][1] == "T5TokenizerFast"
    loaded = load_model(ModelConfig(pretrained_model_name_or_path=str(folder)))
    for a, b in zip((tiny_sd3.unet, tiny_sd3.vae, *tiny_sd3.text_encoders),
                    (loaded.unet, loaded.vae, *loaded.text_encoders)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert loaded.family == "sd3" and loaded.prediction_type == "flow"
    assert loaded.tokenizers[2]("a red photo").input_ids == tiny_sd3.tokenizers[2]("a red photo").input_ids
    # Without T5 (model.use_t5 = false): two encoders, two tokenizers.
    no_t5 = load_model(ModelConfig(pretrained_model_name_or_path=str(folder), use_t5=False))
    assert len(no_t5.text_encoders) == 2 and len(no_t5.tokenizers) == 2
    # The reference builds the same weights.
    ref = load_model(ModelConfig(pretrained_model_name_or_path="tiny:sd3"))
    sa, sb = tiny_sd3.unet.state_dict(), ref.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and ref.source == "tiny:sd3"


def test_sd3_folder_refuses_other_prediction_types(tmp_path, tiny_sd3):
    from library.config.model import ModelConfig
    from library.errors import ConfigError
    from library.models.load import load_model

    with pytest.raises(ConfigError, match="does not apply to SD3"):
        load_model(ModelConfig(pretrained_model_name_or_path="tiny:sd3", prediction_type="v_prediction"))


def test_colour_codec_with_16_channels_round_trips_colour(tiny_sd3):
    vae = tiny_sd3.vae
    image = torch.zeros(1, 3, 64, 64)
    image[:, 0] = 0.8  # red
    image[:, 2, :, 32:] = -0.6  # right half less blue
    with torch.no_grad():
        z = vae.encode(image).latent_dist.mode()
        out = vae.decode(z).sample
    assert z.shape == (1, 16, 8, 8)
    assert torch.allclose(out, image, atol=2e-3)
    # Every latent channel carries colour (as the released 16 do), with the 4-channel codec's spread.
    assert (z.flatten(2).abs().amax(-1) > 0.05).all()


def test_peek_sd3_reads_configs_and_headers_only(tmp_path, tiny_sd3):
    from library.config.model import ModelConfig
    from library.models.sd3.peek import peek_sd3
    from library.models.save import save_diffusers
    from library.models.sd3.single_file import save_sd3_single_file

    facts = peek_sd3(ModelConfig(pretrained_model_name_or_path="tiny:sd3"))
    assert facts[0] == "sd3" and facts[2:] == ("flow", 8, 8)
    assert peek_sd3(ModelConfig(pretrained_model_name_or_path="tiny:sd15")) is None
    folder = save_diffusers(tiny_sd3, tmp_path / "m", dtype=torch.float32)
    assert peek_sd3(ModelConfig(pretrained_model_name_or_path=str(folder)))[1] == folder
    path = tmp_path / "m.safetensors"
    save_sd3_single_file(tiny_sd3, path)
    # A single file names its variant's bundled folder (SD3.5 Medium layout here): 128 latents = 1024 px.
    assert peek_sd3(ModelConfig(pretrained_model_name_or_path=str(path)))[1:] == (
        bundled_config_dir("sd35_medium"), "flow", 128, 8)


def test_generic_savers_dispatch_sd3(tmp_path, tiny_sd3):
    """What the methods call (save_single_file, save_diffusers) writes the SD3 layouts for an SD3 model."""
    from safetensors import safe_open

    from library.models.save import save_diffusers
    from library.models.sd3.single_file import model_to_sd3_file
    from library.models.single_file import save_single_file

    path = tmp_path / "m.safetensors"
    save_single_file(tiny_sd3, path, dtype=torch.float16)
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(model_to_sd3_file(tiny_sd3))
    out = save_diffusers(tiny_sd3, tmp_path / "folder", dtype=torch.float32)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
