"""Block slots of block-weighted merges on the real SD1.5 / SD2.1 / SDXL key lists (meta device), and alpha forms."""

import json

import pytest

from library.errors import ConfigError
from library.merge.blocks import block_slot, parse_block_alphas, preset_values, slot_names
from library.models.configs import bundled_config_dir
from library.models.keymaps import meta_state_dict_keys, unet_keymap

# Counted by hand from the LDM layout (openaimodel.py), e.g. SD1 IN01 = ResBlock (10 tensors) + SpatialTransformer
# (26); IN04 adds the ResBlock's skip_connection (2); OUT11 = ResBlock with skip (12) + transformer (26) + final out
# (4); IN00 = time_embed (4) + conv_in (2) (+ SDXL label_emb (4)).
SD_COUNTS = {"IN00": 6, "IN01": 36, "IN02": 36, "IN03": 2, "IN04": 38, "IN05": 36, "IN06": 2, "IN07": 38, "IN08": 36,
             "IN09": 2, "IN10": 10, "IN11": 10, "M00": 46, "OUT00": 12, "OUT01": 12, "OUT02": 14, "OUT03": 38,
             "OUT04": 38, "OUT05": 40, "OUT06": 38, "OUT07": 38, "OUT08": 40, "OUT09": 38, "OUT10": 38, "OUT11": 42}
SDXL_COUNTS = {"IN00": 10, "IN01": 10, "IN02": 10, "IN03": 2, "IN04": 58, "IN05": 56, "IN06": 2, "IN07": 218,
               "IN08": 216, "M00": 226, "OUT00": 218, "OUT01": 218, "OUT02": 220, "OUT03": 58, "OUT04": 58,
               "OUT05": 60, "OUT06": 12, "OUT07": 12, "OUT08": 16}


def _ldm_unet_keys(name):
    cfg = json.loads((bundled_config_dir(name) / "unet" / "config.json").read_text())
    return unet_keymap(cfg, meta_state_dict_keys("unet", cfg)).ldm_keys()


@pytest.mark.parametrize("name,family,counts,total", [("sd15", "sd1", SD_COUNTS, 686), ("sd21", "sd2", SD_COUNTS, 686),
                                                      ("sdxl", "sdxl", SDXL_COUNTS, 1680)])
def test_slot_counts_on_released_layouts(name, family, counts, total):
    keys = _ldm_unet_keys(name)
    assert len(keys) == total
    got = {}
    for k in keys:
        got[block_slot(k, family)] = got.get(block_slot(k, family), 0) + 1
    assert got == counts
    assert set(got) == set(slot_names(family)) - {"BASE"}  # every UNet slot is used, BASE by no UNet key


def test_slot_of_named_keys():
    u = "model.diffusion_model."
    assert block_slot(u + "time_embed.0.weight", "sd1") == "IN00"
    assert block_slot(u + "input_blocks.0.0.weight", "sd1") == "IN00"
    assert block_slot(u + "input_blocks.11.0.in_layers.2.weight", "sd1") == "IN11"
    assert block_slot(u + "middle_block.1.proj_in.weight", "sd1") == "M00"
    assert block_slot(u + "output_blocks.3.1.proj_out.bias", "sd1") == "OUT03"
    assert block_slot(u + "out.2.weight", "sd1") == "OUT11"
    assert block_slot(u + "out.0.bias", "sdxl") == "OUT08"
    assert block_slot(u + "label_emb.0.0.weight", "sdxl") == "IN00"
    assert block_slot("cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd1") == "BASE"
    assert block_slot("conditioner.embedders.1.model.ln_final.weight", "sdxl") == "BASE"
    assert block_slot("first_stage_model.decoder.conv_in.weight", "sdxl") == "BASE"
    assert block_slot("alphas_cumprod", "sd1") == "BASE"
    with pytest.raises(ValueError, match="input_blocks.9"):
        block_slot(u + "input_blocks.9.0.op.weight", "sdxl")  # SDXL has IN00-IN08
    with pytest.raises(ValueError):
        block_slot(u + "label_emb.0.0.weight", "sd1")


def test_slot_names():
    assert len(slot_names("sd1")) == 26 and len(slot_names("sdxl")) == 20
    assert slot_names("sdxl")[:2] == ["BASE", "IN00"] and slot_names("sdxl")[9:11] == ["IN08", "M00"]
    assert slot_names("sd2")[-1] == "OUT11"


def test_presets_exact():
    v = preset_values("GRAD_V", "sd1")
    assert len(v) == 25 and v[0] == 1.0 and v[12] == 0.0 and v[24] == 1.0
    assert v[1] == pytest.approx(11 / 12) and v[13] == pytest.approx(1 / 12)
    assert preset_values("grad_a", "sdxl") == [round(1 - abs(i - 9) / 9, 10) for i in range(19)]
    assert preset_values("MIDDLE", "sd1") == [0.0] * 12 + [1.0] + [0.0] * 12
    assert preset_values("SMOOTHSTEP", "sdxl")[9] == 0.5
    with pytest.raises(ConfigError, match="GRAD_V"):
        preset_values("NOPE", "sd1")


def test_parse_forms():
    d = parse_block_alphas([0.5] * 25, "sd1", 0.3, what="merge.block_alphas")
    assert d["BASE"] == 0.3 and d["OUT11"] == 0.5 and len(d) == 26
    d = parse_block_alphas([0.1] + [0.5] * 25, "sd1", 0.3, what="x")
    assert d["BASE"] == 0.1
    text = "0.2," + ",".join(str(i / 100) for i in range(19))
    d = parse_block_alphas(text, "sdxl", 0.9, what="x")
    assert d["BASE"] == 0.2 and d["IN00"] == 0.0 and d["OUT08"] == 0.18
    d = parse_block_alphas("GRAD_V", "sdxl", 0.25, what="x")
    assert d["BASE"] == 0.25 and d["M00"] == 0.0 and d["IN00"] == 1.0
    assert parse_block_alphas("", "sd1", 0.4, what="x") == {s: 0.4 for s in slot_names("sd1")}
    with pytest.raises(ConfigError, match=r"merge.block_alphas has 25 values.*sdxl.*19.*20"):
        parse_block_alphas([0.5] * 25, "sdxl", 0.5, what="merge.block_alphas")
    with pytest.raises(ConfigError, match="commas"):
        parse_block_alphas("0.5,abc", "sd1", 0.5, what="x")
