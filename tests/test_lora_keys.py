"""Golden kohya key names and counts on full-size SD1.5, SD2.1 and SDXL built on the meta device (no memory, no weights).

Expected module counts are the ones sd-scripts' networks/lora.py logs ("create LoRA for Text Encoder: N modules",
"create LoRA for U-Net: N modules"), re-derived here from the architectures:
- SD1.5 UNet 192 = 16 Transformer2DModel x (attn1 q,k,v,out + attn2 q,k,v,out + ff net.0.proj, net.2 + proj_in +
  proj_out); text encoder 72 = 12 layers x (q, k, v, out_proj, fc1, fc2).
- SD1.5 LoCon (conv_dim) UNet 278 = 192 + 22 resnets x (conv1, conv2, time_emb_proj) + 14 conv_shortcut (2 down, 12
  up) + 3 downsamplers + 3 upsamplers.
- SDXL UNet 722 = 70 transformer blocks x 10 + 11 Transformer2DModel x (proj_in, proj_out); text encoders 72 + 192
  (ViT-L 12 layers, bigG 32 layers, x 6).  SDXL LoCon UNet 788 = 722 + 17 resnets x 3 + 11 shortcuts + 2 + 2 samplers.
- SD2.1 text encoder (OpenCLIP ViT-H, 23 layers as diffusers ships it) 138; UNet 192 as SD1.5.
"""

from __future__ import annotations

import json

import pytest
import torch

from library.config.network import NetworkConfig
from library.models.configs import bundled_config_dir
from library.models.model import SDModel
from library.networks.kohya import _unet_sgm_modules, kohya_name, module_names, network_state_dict_kohya
from library.networks.lora import inject_network, plan_ranks


def meta_model(name: str, family: str) -> SDModel:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = bundled_config_dir(name)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((root / "unet" / "config.json").read_text()))
        tes = [CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))]
        if family == "sdxl":
            tes.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(root / "text_encoder_2")))
    return SDModel(family, "epsilon", unet, None, tes, [], {}, f"meta:{name}", root)


def counts(names: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        prefix = n.split("_")[1]  # unet, te, te1, te2
        out[prefix] = out.get(prefix, 0) + 1
    return out


@pytest.fixture
def meta_models(full_size_meta):
    """The full-size models on the meta device, shared by the session (tests/conftest.py); only planned on here."""
    return full_size_meta


@pytest.mark.parametrize(
    "name,conv_dim,target,expected",
    [
        ("sd15", 0, "attn_mlp", {"unet": 192, "te": 72}),
        ("sd15", 4, "attn_mlp", {"unet": 278, "te": 72}),
        ("sd15", 0, "attn", {"unet": 16 * 8, "te": 12 * 4}),
        ("sd15", 0, "all_linear", {"unet": 192 + 22 + 14, "te": 72}),
        ("sd21", 0, "attn_mlp", {"unet": 192, "te": 138}),
        ("sdxl", 0, "attn_mlp", {"unet": 722, "te1": 72, "te2": 192}),
        ("sdxl", 4, "attn_mlp", {"unet": 788, "te1": 72, "te2": 192}),
    ],
)
def test_module_counts_match_sd_scripts(meta_models, name, conv_dim, target, expected):
    """The planned module set (what inject_network adapts), named as in the file, without building adapters."""
    model = meta_models[name]
    sgm = _unet_sgm_modules(model.unet.config) if model.family == "sdxl" else None
    plan = plan_ranks(model, NetworkConfig(conv_dim=conv_dim, target=target))
    names = [kohya_name(model.family, c, p, sgm) for c, entries in plan.items() for p in entries]
    assert len(set(names)) == len(names)
    assert counts(names) == expected
    if model.family == "sdxl":  # our block index from diffusers paths == sd-scripts' rule on the SGM names
        for path, (_, _, _, block) in plan["unet"].items():
            n = kohya_name("sdxl", "unet", path, sgm).removeprefix("lora_unet_").split("_")
            assert block == {"input": 1, "middle": 10, "output": 13}[n[0]] + int(n[2]), path
    assert all(n.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for n in names)


def test_sd15_golden_names_and_tensors():
    model = meta_model("sd15", "sd1")
    net = inject_network(model, NetworkConfig(network_dim=8, network_alpha=4, conv_dim=2))
    names = module_names(model, net)
    for n in ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
              "lora_unet_down_blocks_0_attentions_0_proj_in",
              "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj",
              "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
              "lora_unet_down_blocks_0_resnets_0_conv1",
              "lora_unet_down_blocks_0_downsamplers_0_conv",
              "lora_unet_up_blocks_0_upsamplers_0_conv",
              "lora_unet_up_blocks_1_resnets_0_conv_shortcut",
              "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
              "lora_te_text_model_encoder_layers_11_mlp_fc2"]:
        assert n in names, n
    sd = network_state_dict_kohya(model, net)
    assert len(sd) == 3 * (278 + 72)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert sd[f"{q}.lora_down.weight"].shape == (8, 768) and sd[f"{q}.lora_up.weight"].shape == (320, 8)
    assert sd[f"{q}.alpha"].shape == () and sd[f"{q}.alpha"].item() == 4.0
    pin = "lora_unet_down_blocks_0_attentions_0_proj_in"  # SD1 proj_in is a 1x1 conv: network_dim, 4-D
    assert sd[f"{pin}.lora_down.weight"].shape == (8, 320, 1, 1) and sd[f"{pin}.lora_up.weight"].shape == (320, 8, 1, 1)
    c = "lora_unet_down_blocks_0_resnets_0_conv1"  # LoCon: down k x k, up 1 x 1
    assert sd[f"{c}.lora_down.weight"].shape == (2, 320, 3, 3) and sd[f"{c}.lora_up.weight"].shape == (320, 2, 1, 1)
    t = "lora_unet_down_blocks_0_resnets_0_time_emb_proj"  # Linear inside a resnet: network_dim, as sd-scripts
    assert sd[f"{t}.lora_down.weight"].shape == (8, 1280)


def test_sdxl_golden_names():
    model = meta_model("sdxl", "sdxl")
    net = inject_network(model, NetworkConfig(conv_dim=2))
    names = module_names(model, net)
    for n in ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
              "lora_unet_input_blocks_7_1_transformer_blocks_9_ff_net_2",
              "lora_unet_middle_block_1_proj_out",
              "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q",
              "lora_unet_input_blocks_1_0_in_layers_2",
              "lora_unet_input_blocks_1_0_emb_layers_1",
              "lora_unet_input_blocks_3_0_op",
              "lora_unet_output_blocks_2_2_conv",
              "lora_unet_output_blocks_0_0_skip_connection",
              "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
              "lora_te2_text_model_encoder_layers_31_mlp_fc1"]:
        assert n in names, n
    assert not any("down_blocks" in n or "text_projection" in n for n in names)


def test_unet_only_adapts_no_text_encoder():
    model = meta_model("sd15", "sd1")
    net = inject_network(model, NetworkConfig(target="attn", train_unet_only=True))
    names = module_names(model, net)
    assert counts(list(names)) == {"unet": 16 * 8}
    assert all(n.endswith(("_to_q", "_to_k", "_to_v", "_to_out_0")) for n in names)


def test_kohya_name_rules():
    assert kohya_name("sd1", "text_encoder", "encoder.layers.3.mlp.fc1") == "lora_te_text_model_encoder_layers_3_mlp_fc1"
    # CLIPTextModelWithProjection keeps `text_model.` in transformers 5; it must not be doubled
    assert kohya_name("sdxl", "text_encoder_2", "text_model.encoder.layers.0.self_attn.k_proj") == \
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj"
    assert kohya_name("sd2", "unet", "up_blocks.1.attentions.2.proj_out") == "lora_unet_up_blocks_1_attentions_2_proj_out"
