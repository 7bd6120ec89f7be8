"""Block-weighted merge slots for SD3 / SD3.5 (ComfyUI's ModelMergeSD3_2B / ModelMergeSD35_Large layout)."""

from __future__ import annotations

import pytest

from library.errors import ConfigError
from library.merge.blocks import block_slot, parse_block_alphas, preset_values, sd3_blocks_in, slot_names

U = "model.diffusion_model."


def test_sd3_slots_and_key_to_slot():
    slots = slot_names("sd3", 24)
    assert len(slots) == 31 and slots[:3] == ["BASE", "pos_embed", "x_embedder"]
    assert slots[6] == "joint_blocks.0" and slots[-2] == "joint_blocks.23" and slots[-1] == "final_layer"
    assert len(slot_names("sd3", 38)) == 45
    cases = {
        U + "pos_embed": "pos_embed",
        U + "x_embedder.proj.weight": "x_embedder",
        U + "context_embedder.bias": "context_embedder",
        U + "y_embedder.mlp.0.weight": "y_embedder",
        U + "t_embedder.mlp.2.bias": "t_embedder",
        U + "joint_blocks.0.x_block.attn.qkv.weight": "joint_blocks.0",
        U + "joint_blocks.13.context_block.adaLN_modulation.1.bias": "joint_blocks.13",
        U + "final_layer.linear.weight": "final_layer",
        "first_stage_model.decoder.conv_in.weight": "BASE",
        "text_encoders.t5xxl.transformer.shared.weight": "BASE",
    }
    for key, slot in cases.items():
        assert block_slot(key, "sd3") == slot, key
    with pytest.raises(ValueError, match="not an MMDiT key"):
        block_slot(U + "input_blocks.0.0.weight", "sd3")
    with pytest.raises(ValueError, match="number of joint blocks"):
        slot_names("sd3")


def test_sd3_alphas_in_every_form():
    values = [0.1 * (i % 10) for i in range(30)]
    got = parse_block_alphas(values, "sd3", 0.5, what="merge.block_alphas", n_blocks=24)
    assert got["BASE"] == 0.5 and got["pos_embed"] == 0.0 and got["joint_blocks.0"] == pytest.approx(0.5)
    assert got["final_layer"] == pytest.approx(0.9)
    text = ",".join(str(v) for v in [0.25] + values)
    assert parse_block_alphas(text, "sd3", 0.5, what="x", n_blocks=24)["BASE"] == 0.25
    lin = preset_values("LINEAR", "sd3", 24)
    assert len(lin) == 30 and lin[0] == 0.0 and lin[-1] == 1.0
    with pytest.raises(ConfigError, match="takes 30 \\(pos_embed..final_layer"):
        parse_block_alphas([0.5] * 25, "sd3", 0.5, what="merge.block_alphas", n_blocks=24)


def test_block_count_from_keys():
    keys = [U + f"joint_blocks.{i}.x_block.attn.qkv.weight" for i in range(38)] + [U + "final_layer.linear.bias"]
    assert sd3_blocks_in(keys) == 38
    with pytest.raises(ValueError, match="not numbered"):
        sd3_blocks_in([U + "joint_blocks.1.x_block.mlp.fc1.weight"])
