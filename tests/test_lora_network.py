"""[network] config rules, sd-scripts block indices / per-block ranks / lr weights, optimizer groups, max-norm."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from library.config.network import NetworkConfig
from library.errors import ConfigError
from library.networks.kohya import module_names
from library.networks.lora import (NUM_BLOCKS, adapter_params, apply_max_norm, block_index, block_lr_weights,
                                   inject_network, lr_weight_list, param_groups, plan_ranks)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread


@pytest.fixture
def sd1(tiny_sd1):
    """A copy of the session's shared tiny SD1 model (tests/conftest.py), which these tests change."""
    return copy.deepcopy(tiny_sd1)


@pytest.mark.parametrize("kwargs,match", [
    ({"network_module": "locon"}, "conv_dim"),
    ({"target": "attn_mlp+conv"}, "conv_dim"),
    ({"rank_dropout": 0.1}, "loha and lokr"),
    ({"network_module": "loha", "network_dropout": 0.1}, "rank_dropout"),
    ({"network_module": "lokr", "loraplus_lr_ratio": 16}, "lora, locon or dora"),
    ({"network_dim": 0}, "network_dim"),
    ({"down_lr_weight": "cosin"}, "preset"),
    ({"up_lr_weight": "linear+x"}, "number"),
    ({"block_alphas": [1.0]}, "block_dims"),
    ({"train_unet_only": True, "train_text_encoder_only": True}, "both"),
    ({"network_module": "dora", "scale_weight_norms": 1.0}, "DoRA"),
])
def test_config_rules(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        NetworkConfig(**kwargs).validate()


def test_config_accepts_sd_scripts_names():
    cfg = NetworkConfig(network_module="networks.lora", conv_dim=4, down_lr_weight="cosine+0.5")
    cfg.validate()
    assert cfg.module == "lora" and cfg.adapts_conv


@pytest.mark.parametrize("path,family,expected", [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "sd1", 1),  # input_blocks.1
    ("down_blocks.0.downsamplers.0.conv", "sd1", 3),
    ("down_blocks.3.resnets.1.conv2", "sd1", 11),
    ("mid_block.attentions.0.proj_in", "sd1", 12),
    ("up_blocks.0.resnets.0.conv1", "sd1", 13),  # output_blocks.0
    ("up_blocks.0.upsamplers.0.conv", "sd1", 15),
    ("up_blocks.3.attentions.2.proj_out", "sd2", 24),
    ("down_blocks.1.attentions.0.proj_in", "sdxl", 5),  # input_blocks.4 -> 1 + 4
    ("mid_block.resnets.0.conv1", "sdxl", 10),
    ("mid_block.attentions.0.proj_in", "sdxl", 11),
    ("mid_block.resnets.1.time_emb_proj", "sdxl", 12),
    ("up_blocks.2.attentions.2.proj_out", "sdxl", 21),  # output_blocks.8 -> 13 + 8
    ("time_embedding.linear_1", "sdxl", 0),
    ("conv_out", "sdxl", 22),
])
def test_block_index_matches_sd_scripts(path, family, expected):
    assert block_index(path, family) == expected


def test_lr_weight_presets_exact():
    assert lr_weight_list("linear", 12) == [i / 11 for i in range(12)]
    assert lr_weight_list("reverse_linear", 3) == [1.0, 0.5, 0.0]
    assert lr_weight_list("sine", 3) == [0.0, math.sin(math.pi / 4), 1.0]
    assert lr_weight_list("cosine", 3) == [1.0, math.sin(math.pi / 4), 0.0]
    assert lr_weight_list("zeros+0.5", 4) == [0.5] * 4
    assert lr_weight_list([0.2, 0.3], 4) == [0.2, 0.3, 1.0, 1.0]  # sd-scripts pads short lists with 1
    with pytest.raises(ConfigError, match="entries"):
        lr_weight_list([1.0] * 13, 12)


def test_block_lr_weights_layout_and_threshold():
    assert block_lr_weights("sd1", [], [], [], 0.0) is None
    w = block_lr_weights("sd1", [0.5], [0.0], "zeros+0.25", 0.3)
    assert len(w) == NUM_BLOCKS["sd1"] == 25
    assert w[0] == 0.5 and w[1:12] == [1.0] * 11 and w[12] == 0.0 and w[13:] == [0.0] * 12  # 0.25 <= threshold
    x = block_lr_weights("sdxl", "zeros", [1.0, 0.5], [], 0.0)
    assert len(x) == NUM_BLOCKS["sdxl"] == 23
    assert x[0] == 1.0 and x[1:10] == [0.0] * 9 and x[10:13] == [1.0, 0.5, 1.0] and x[13:22] == [1.0] * 9 and x[22] == 1.0


def test_per_block_ranks_and_lr_zero_removal(tiny_sd1):
    dims = [4] * 25
    dims[1], dims[12] = 8, 0  # IN01 rank 8, mid block none
    alphas = [1.0] * 25
    alphas[1] = 4.0
    plan = plan_ranks(tiny_sd1, NetworkConfig(block_dims=dims, block_alphas=alphas, up_lr_weight="zeros",
                                              train_unet_only=True))["unet"]
    assert plan["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"][1:] == (8, 4.0, 1)
    assert plan["down_blocks.1.attentions.0.proj_in"][1:] == (4, 1.0, 4)
    assert not any(p.startswith(("mid_block", "up_blocks")) for p in plan)  # rank 0 / lr weight 0 -> no adapter
    with pytest.raises(ConfigError, match="25"):
        plan_ranks(tiny_sd1, NetworkConfig(block_dims=[4] * 23))


def test_param_groups_names_lrs_and_loraplus(sd1):
    net = inject_network(sd1, NetworkConfig(loraplus_lr_ratio=16, down_lr_weight=[1.0, 0.5]))
    groups = param_groups(net, base_lr=1e-4, unet_lr=2e-4, te_lr=None)
    by_name = {g["name"]: g for g in groups}
    assert by_name["text_encoder"]["lr"] == 1e-4 and by_name["text_encoder plus"]["lr"] == pytest.approx(16e-4)
    assert by_name["unet_block1"]["lr"] == pytest.approx(1e-4) and by_name["unet_block1 plus"]["lr"] == pytest.approx(16e-4)
    assert by_name["unet_block16"]["lr"] == 2e-4  # up_blocks.1.attentions.0 = OUT03, weight 1
    assert "unet_block0" not in by_name  # IN00 (conv_in) has no adapter
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(net.parameters())  # each parameter exactly once
    plus = {id(p) for g in groups if g["name"].endswith("plus") for p in g["params"]}
    assert plus == {id(adapter_params(m.layer, net.adapter_name)["lora_B"]) for m in net.modules}
    no_te = param_groups(net, base_lr=1e-4, unet_lr=None, te_lr=0.0)  # sd-scripts: lr 0 -> group left out
    assert not any(g["name"].startswith("text_encoder") for g in no_te)
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for p in sd1.vae.parameters())


def test_max_norm_exact(sd1):
    net = inject_network(sd1, NetworkConfig(network_dim=2, network_alpha=2.0, train_unet_only=True, target="attn"))
    with torch.no_grad():
        for i, m in enumerate(net.modules):
            p = adapter_params(m.layer, net.adapter_name)
            p["lora_A"].zero_()
            p["lora_B"].zero_()
            p["lora_A"][0, 0] = 1.0
            p["lora_B"][0, 0] = 3.0 if i == 0 else 0.5  # delta norm = 3 * scale 1 = 3, others 0.5
    scaled, mean, largest = apply_max_norm(net, 1.0)
    assert scaled == 1 and largest == pytest.approx(1.0)
    assert mean == pytest.approx((1.0 + 0.5 * (len(net.modules) - 1)) / len(net.modules))
    first = adapter_params(net.modules[0].layer, net.adapter_name)
    assert first["lora_A"][0, 0].item() == pytest.approx(1 / math.sqrt(3))  # both factors by sqrt(1/3)
    assert net.modules[0].layer.get_delta_weight(net.adapter_name).norm().item() == pytest.approx(1.0)


def test_loha_dropouts_reach_peft_and_max_norm_spreads_over_four_factors(sd1):
    net = inject_network(sd1, NetworkConfig(network_module="loha", rank_dropout=0.1, module_dropout=0.2,
                                            train_unet_only=True, target="attn"))
    layer = net.modules[0].layer
    assert layer.rank_dropout[net.adapter_name] == 0.1 and layer.module_dropout[net.adapter_name] == 0.2
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    norm = layer.get_delta_weight(net.adapter_name).norm().item()
    scaled, _, largest = apply_max_norm(net, norm / 16)
    assert scaled == len(net.modules) and largest == pytest.approx(norm / 16, rel=1e-5)
    assert adapter_params(layer, net.adapter_name)["hada_w1_a"][0, 0].item() == pytest.approx(0.5)  # 16 ** (1/4)


def test_text_encoder_only_and_names(sd1):
    net = inject_network(sd1, NetworkConfig(train_text_encoder_only=True, target="attn"))
    names = module_names(sd1, net)
    assert names and all(n.startswith("lora_te_text_model_encoder_layers_") for n in names)
    assert all(n.endswith(("q_proj", "k_proj", "v_proj", "out_proj")) for n in names)
