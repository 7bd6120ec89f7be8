"""SD3 LoRA: MMDiT targets, the diffusers layout diffusers' StableDiffusion3Pipeline loads (outputs to 1e-5), the
sd-scripts fused-qkv layout (exact), strict loading."""

from __future__ import annotations

import copy

import pytest
import torch

from library.config.network import NetworkConfig
from library.errors import ModelFileError
from library.networks import sd3_keys
from library.networks.lora import inject_network


@pytest.fixture(scope="module")
def base():
    from library.models.tiny import build_tiny

    model = build_tiny("sd3", seed=4)
    model.extra["t5xxl_max_token_length"] = 16
    return model


def _trained(base, **kw):
    """A copy of the base with LoRA injected and random (non-zero) up weights, as after some training."""
    model = copy.deepcopy(base)
    cfg = NetworkConfig(network_dim=4, network_alpha=2.0, **kw)
    network = inject_network(model, cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in network.modules:
            b = m.layer.lora_B[network.adapter_name].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model, network


def _pipeline(model):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tes, toks = model.text_encoders, model.tokenizers
    return StableDiffusion3Pipeline(
        transformer=model.unet, scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config),
        vae=model.vae, text_encoder=tes[0], tokenizer=toks[0], text_encoder_2=tes[1], tokenizer_2=toks[1],
        text_encoder_3=tes[2], tokenizer_3=toks[2])


def _outputs(pipe, prompt="a red photo of a cat"):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 8, 8, generator=g)
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, do_classifier_free_guidance=False,
                                                  max_sequence_length=16)
        out = pipe.transformer(hidden_states=latents, timestep=torch.tensor([400.0]), encoder_hidden_states=hidden,
                               pooled_projections=pooled).sample
    return hidden, pooled, out


def test_targets_cover_the_mmdit_streams(base):
    paths = sd3_keys.select_sd3_targets(base.unet, "unet", "attn")
    assert "transformer_blocks.0.attn.to_q" in paths and "transformer_blocks.0.attn.add_k_proj" in paths
    assert "transformer_blocks.0.attn2.to_v" in paths and "transformer_blocks.2.attn.to_add_out" not in paths
    assert not any(".ff." in p for p in paths)
    mlp = sd3_keys.select_sd3_targets(base.unet, "unet", "attn_mlp")
    assert "transformer_blocks.1.ff_context.net.2" in mlp and "transformer_blocks.1.norm1.linear" not in mlp
    assert "transformer_blocks.1.norm1.linear" in sd3_keys.select_sd3_targets(base.unet, "unet", "all_linear")


def test_diffusers_load_lora_weights_reproduces_the_trained_outputs(base, tmp_path):
    from safetensors.torch import save_file

    model, network = _trained(base)
    assert {m.component for m in network.modules} == {"unet", "text_encoder", "text_encoder_2"}  # T5 off by default
    sd = sd3_keys.state_dict_sd3(model, network, "diffusers")
    assert all(k.startswith(("transformer.transformer_blocks.", "text_encoder.text_model.",
                             "text_encoder_2.text_model.")) for k in sd)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in sd
    path = tmp_path / "lora.safetensors"
    save_file(sd, path, metadata=sd3_keys.metadata_sd3(model, network, "diffusers"))
    want = _outputs(_pipeline(model))
    pipe = _pipeline(copy.deepcopy(base))
    before = _outputs(pipe)
    pipe.load_lora_weights(str(path))
    got = _outputs(pipe)
    for w, g, b in zip(want, got, before):
        assert not torch.allclose(w, b, atol=1e-4)  # the LoRA changes every output
        assert torch.allclose(w, g, atol=1e-5, rtol=0)


def test_sd_scripts_layout_fuses_qkv_exactly_and_round_trips(base):
    model, network = _trained(base, train_unet_only=True)
    sd = sd3_keys.state_dict_sd3(model, network, "sd_scripts")
    assert all(k.startswith("lora_unet_") for k in sd)
    name = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    down, up, alpha = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"], sd[f"{name}.alpha"]
    assert down.shape == (12, 64) and up.shape == (192, 12) and alpha.item() == 6.0
    fused_delta = up @ down * (alpha / down.shape[0])
    parts = {m.path: m for m in network.modules}
    deltas = []
    for p in ("to_q", "to_k", "to_v"):
        layer = parts[f"transformer_blocks.0.attn.{p}"].layer
        deltas.append(layer.lora_B["sdtk"].weight @ layer.lora_A["sdtk"].weight * (2.0 / 4))
    assert torch.allclose(fused_delta, torch.cat(deltas), atol=1e-7, rtol=0)
    assert "lora_unet_joint_blocks_2_context_block_attn_qkv.lora_down.weight" in sd
    assert "lora_unet_joint_blocks_1_x_block_mlp_fc2.alpha" in sd
    # Back into a fresh network: the same tensors.
    fresh_model, fresh = _trained(base, train_unet_only=True)
    sd3_keys.load_sd3_into(fresh_model, fresh, sd, {})
    again = sd3_keys.state_dict_sd3(fresh_model, fresh, "sd_scripts")
    assert all(torch.equal(again[k], sd[k]) for k in sd)


def test_loading_is_strict(base):
    model, network = _trained(base, train_unet_only=True)
    sd = sd3_keys.state_dict_sd3(model, network, "diffusers")
    meta = sd3_keys.metadata_sd3(model, network, "diffusers")
    fresh_model, fresh = _trained(base, train_unet_only=True)
    sd3_keys.load_sd3_into(fresh_model, fresh, sd, meta)  # alpha folded on save, unfolded on load
    b0 = network.modules[0].layer.lora_B["sdtk"].weight
    assert torch.allclose(fresh.modules[0].layer.lora_B["sdtk"].weight, b0, atol=1e-7)
    with pytest.raises(ModelFileError, match="unexpected key 'transformer.bogus.lora_A.weight'"):
        sd3_keys.load_sd3_into(fresh_model, fresh, {**sd, "transformer.bogus.lora_A.weight": torch.zeros(1)}, meta)
    kohya = sd3_keys.state_dict_sd3(model, network, "sd_scripts")
    name = "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"
    kohya[name] = torch.ones_like(kohya[name])  # trained fused: no exact split
    with pytest.raises(ModelFileError, match="not block-diagonal"):
        sd3_keys.load_sd3_into(fresh_model, fresh, kohya, {})


def test_options_that_do_not_apply_to_sd3(base):
    from library.errors import ConfigError

    with pytest.raises(ConfigError, match="no convolutions"):
        _trained(base, target="attn+conv", conv_dim=4)
    with pytest.raises(ConfigError, match="per-block"):
        _trained(base, block_dims=[4] * 25)


def test_file_round_trip_and_refusals(base, tmp_path):
    model, network = _trained(base)
    for layout in ("diffusers", "sd_scripts"):
        path = tmp_path / f"{layout}.safetensors"
        sd3_keys.save_sd3_lora(path, sd3_keys.state_dict_sd3(model, network, layout, torch.float32),
                               sd3_keys.metadata_sd3(model, network, layout))
        fresh_model, fresh = _trained(base)
        meta = sd3_keys.load_sd3_file_into(fresh_model, fresh, path)
        assert meta["ss_base_model_version"] == "5-medium" and meta["sdtk_lora_layout"] == layout
        for a, b in zip(network.modules, fresh.modules):
            for part in ("lora_A", "lora_B"):
                assert torch.allclose(getattr(a.layer, part)["sdtk"].weight, getattr(b.layer, part)["sdtk"].weight,
                                      atol=1e-7), (layout, a.path)
    sd = sd3_keys.state_dict_sd3(model, network, "diffusers")
    sd[next(iter(sd))] = torch.full_like(sd[next(iter(sd))], float("inf"))
    with pytest.raises(ModelFileError, match="inf or NaN"):
        sd3_keys.save_sd3_lora(tmp_path / "bad.safetensors", sd, {})
    assert not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(ModelFileError, match="lacks the diffusers prefixes"):
        sd3_keys.save_sd3_lora(tmp_path / "bad.safetensors", {"unet.x.lora_A.weight": torch.zeros(1)}, {})


@pytest.mark.parametrize("module", ["dora", "loha", "lokr"])
def test_adapters_sd3_files_cannot_hold_are_refused_before_training(base, module):
    """The SD3 writer holds plain LoRA only: another network_module is refused when the network is planned (a DoRA
    used to train to the end and fail at the save)."""
    from library.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"network.network_module = '{module}' is not offered for SD3 \(plain LoRA "
                                          r"only\).*set network.network_module = 'lora'"):
        inject_network(copy.deepcopy(base), NetworkConfig(network_dim=4, network_alpha=2.0, network_module=module))
