"""Key maps diffusers <-> LDM/SGM: full-size coverage on the meta device (every key, released counts), reversibility,
strictness, and agreement with diffusers' own single-file converters (names at full size, values on tiny weights)."""

from __future__ import annotations

import pytest
import torch

from library.models import keymaps_clip as kc
from library.models.configs import bundled_config_dir
from library.models.keymaps import KeyMapError, from_ldm, to_ldm, unet_key_map, unet_keymap, vae_keymap
from library.models.single_file import NON_WEIGHT_KEYS, SD2_TE, model_keymaps, model_to_ldm

# Released single-file key counts (weights + the non-weight keys we also write: CLIP position_ids, OpenCLIP
# logit_scale; DDPM buffers / EMA copies excluded). Derived from the original module definitions -- LDM
# openaimodel.UNetModel / model.Encoder+Decoder, transformers CLIPTextModel, open_clip TextTransformer -- and
# checked below against diffusers' own LDM converters:
#   UNet SD1/SD2 686 (the figure usually quoted for SD1.5), SDXL 1680; VAE 248 (all families);
#   CLIP-L 196 weights + position_ids = 197 (12 layers x 16 + 4);
#   OpenCLIP ViT-H (SD2) 24 resblocks x 12 + token_embedding, positional_embedding, ln_final x2, text_projection,
#   logit_scale = 294; OpenCLIP bigG (SDXL) 32 x 12 + 6 = 390.
RELEASED = {
    "sd15": {"unet": 686, "vae": 248, "text_encoder": 197, "total": 1131},
    "sd21": {"unet": 686, "vae": 248, "text_encoder": 294, "total": 1228},
    "sdxl": {"unet": 1680, "vae": 248, "text_encoder": 197, "text_encoder_2": 390, "total": 2515},
}
@pytest.fixture
def full(full_size_meta):
    """The full-size models on the meta device, shared by the session (tests/conftest.py); only read here."""
    return full_size_meta


@pytest.mark.parametrize("name", list(RELEASED))
def test_full_size_every_key_maps_both_ways_with_released_counts(full, name, capsys):
    model = full[name]
    ldm = model_to_ldm(model)
    counts = {}
    for part, module, km in model_keymaps(model.family, model.unet, model.vae, model.text_encoders):
        sd = kc.te_state_dict(module) if part.startswith("text_encoder") else module.state_dict()
        mapped = to_ldm(sd, km)
        counts[part] = sum(1 for k in ldm if k.startswith(km.prefix))
        back = from_ldm(mapped, km)
        assert back.keys() == sd.keys()
        assert all(back[k].shape == sd[k].shape for k in sd)
    counts["total"] = len(ldm)
    with capsys.disabled():
        print(f"\n{name} single-file key counts: {counts}")
    assert counts == RELEASED[name]


@pytest.mark.parametrize("name", list(RELEASED))
def test_full_size_names_agree_with_diffusers_converters(full, name):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    model = full[name]
    ldm = model_to_ldm(model)
    unet = convert_ldm_unet_checkpoint(ldm, dict(model.unet.config))
    assert _shapes(unet) == _shapes(model.unet.state_dict())
    vae = convert_ldm_vae_checkpoint(ldm, dict(model.vae.config))
    assert _shapes(vae) == _shapes(model.vae.state_dict())
    te = model.text_encoders
    if name == "sd21":
        clip = convert_open_clip_checkpoint(te[0], ldm, prefix=SD2_TE)
        assert _shapes(clip) == _shapes(kc.te_state_dict(te[0]))  # diffusers also drops resblocks.23
    else:
        clip = convert_ldm_clip_checkpoint(ldm, "conditioner.embedders.0.transformer." if name == "sdxl" else None)
        clip.pop(kc.POSITION_IDS)
        assert _shapes(clip) == _shapes(kc.te_state_dict(te[0]))
    if name == "sdxl":
        g = convert_open_clip_checkpoint(te[1], ldm, prefix="conditioner.embedders.1.model.")
        assert _shapes(g) == _shapes(kc.te_state_dict(te[1]))


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_tiny_values_agree_with_diffusers_converters_and_round_trip(family):
    """Names alone cannot catch two same-shaped blocks swapped; real random weights can."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from library.models.tiny import build_tiny

    model = build_tiny(family, seed=1)
    ldm = model_to_ldm(model)
    for theirs, module in [(convert_ldm_unet_checkpoint(ldm, dict(model.unet.config)), model.unet),
                           (convert_ldm_vae_checkpoint(ldm, dict(model.vae.config)), model.vae)]:
        ours = module.state_dict()
        assert theirs.keys() == ours.keys()
        assert all(torch.equal(theirs[k].reshape(ours[k].shape), ours[k]) for k in ours)
    for part, module, km in model_keymaps(family, model.unet, model.vae, model.text_encoders):
        sd = kc.te_state_dict(module) if part.startswith("text_encoder") else module.state_dict()
        back = from_ldm(to_ldm(sd, km), km)
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_unet_key_map_examples_and_completeness():
    import json

    sd15 = json.loads((bundled_config_dir("sd15") / "unet" / "config.json").read_text())
    m = unet_key_map(sd15)
    assert len(m) == 686 and len(set(m.values())) == 686
    assert m["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"] == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    assert m["down_blocks.0.resnets.0.norm1.weight"] == "input_blocks.1.0.in_layers.0.weight"
    assert m["down_blocks.0.resnets.0.conv2.weight"] == "input_blocks.1.0.out_layers.3.weight"
    assert m["down_blocks.1.resnets.0.conv_shortcut.weight"] == "input_blocks.4.0.skip_connection.weight"
    assert m["down_blocks.0.downsamplers.0.conv.weight"] == "input_blocks.3.0.op.weight"
    assert m["mid_block.resnets.1.time_emb_proj.bias"] == "middle_block.2.emb_layers.1.bias"
    assert m["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.2.1.conv.weight"
    assert m["up_blocks.1.upsamplers.0.conv.weight"] == "output_blocks.5.2.conv.weight"
    assert m["up_blocks.3.attentions.2.proj_out.weight"] == "output_blocks.11.1.proj_out.weight"
    assert m["time_embedding.linear_2.weight"] == "time_embed.2.weight"
    assert m["conv_norm_out.bias"] == "out.0.bias"
    sdxl = json.loads((bundled_config_dir("sdxl") / "unet" / "config.json").read_text())
    x = unet_key_map(sdxl)
    assert len(x) == 1680
    assert x["add_embedding.linear_1.weight"] == "label_emb.0.0.weight"
    assert x["down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight"] == \
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight"
    assert x["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.2.2.conv.weight"


def test_vae_and_openclip_transforms_exact():
    vae_cfg = {"block_out_channels": [4], "layers_per_block": 1}
    w = torch.arange(6.0).reshape(2, 3)
    km = vae_keymap(vae_cfg, ["encoder.mid_block.attentions.0.to_q.weight", "encoder.mid_block.attentions.0.to_q.bias",
                              "decoder.up_blocks.0.resnets.1.conv_shortcut.weight"])
    sd = {"encoder.mid_block.attentions.0.to_q.weight": w, "encoder.mid_block.attentions.0.to_q.bias": w[0],
          "decoder.up_blocks.0.resnets.1.conv_shortcut.weight": w}
    ldm = to_ldm(sd, km)
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (2, 3, 1, 1)
    assert "first_stage_model.decoder.up.0.block.1.nin_shortcut.weight" in ldm
    assert torch.equal(from_ldm(ldm, km)["encoder.mid_block.attentions.0.to_q.weight"], w)

    keys = [f"text_model.encoder.layers.0.self_attn.{p}_proj.weight" for p in "qkv"] + ["text_projection.weight"]
    ocm = kc.openclip_keymap("p.", keys)
    q, k, v, proj = torch.ones(2, 2), 2 * torch.ones(2, 2), 3 * torch.ones(2, 2), torch.tensor([[1.0, 2.0], [3, 4]])
    out = to_ldm(dict(zip(keys, (q, k, v, proj))), ocm)
    assert torch.equal(out["p.transformer.resblocks.0.attn.in_proj_weight"], torch.cat([q, k, v]))
    assert torch.equal(out["p.text_projection"], torch.tensor([[1.0, 3.0], [2.0, 4.0]]))
    back = from_ldm(out, ocm)
    assert all(torch.equal(back[a], b) for a, b in zip(keys, (q, k, v, proj)))


def test_strict_both_ways_names_the_key():
    km = vae_keymap({"block_out_channels": [4], "layers_per_block": 1}, ["quant_conv.weight"])
    with pytest.raises(KeyMapError, match="encoder.unknown.weight"):
        vae_keymap({"block_out_channels": [4], "layers_per_block": 1}, ["encoder.unknown.weight"])
    with pytest.raises(KeyMapError, match="'extra.weight'"):
        to_ldm({"quant_conv.weight": torch.zeros(1), "extra.weight": torch.zeros(1)}, km)
    with pytest.raises(KeyMapError, match="unexpected key 'first_stage_model.stray'"):
        from_ldm({"first_stage_model.quant_conv.weight": torch.zeros(1), "first_stage_model.stray": torch.zeros(1)}, km)
    with pytest.raises(KeyMapError, match="missing key 'first_stage_model.quant_conv.weight'"):
        from_ldm({}, km)
    with pytest.raises(KeyMapError, match="not a Stable Diffusion layout"):
        unet_keymap({"layers_per_block": 2, "down_block_types": ["SimpleCrossAttnDownBlock2D"], "up_block_types": []},
                    [])


def test_text_model_prefix_normalisation_and_listed_extras():
    from transformers import CLIPTextConfig, CLIPTextModel

    te = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=10, max_position_embeddings=5))
    sd = kc.te_state_dict(te)
    assert sd and all(k.startswith("text_model.") for k in sd)  # files always carry the prefix
    assert te.load_state_dict(kc.te_module_keys(te, sd), strict=True)  # and transformers 5 gets its own form back
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in NON_WEIGHT_KEYS
    assert {"alphas_cumprod", "v_pred", "ztsnr"} <= NON_WEIGHT_KEYS
    extra = kc.openclip_extras_to_ignore(SD2_TE, [SD2_TE + "transformer.resblocks.1.ln_1.weight",
                                                  SD2_TE + "transformer.resblocks.0.ln_1.weight",
                                                  SD2_TE + "logit_scale", SD2_TE + "text_projection"], 1, sd2=True)
    assert sorted(extra) == sorted([SD2_TE + "transformer.resblocks.1.ln_1.weight", SD2_TE + "logit_scale",
                                    SD2_TE + "text_projection"])
