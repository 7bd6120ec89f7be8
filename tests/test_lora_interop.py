"""Acceptance: our kohya files load in diffusers (LoRA, LoCon) and reproduce our outputs; LoHa / LoKr / DoRA files use
LyCORIS names and the readers' formulas (A1111 / ComfyUI) reproduce peft's weights; save -> load round trips;
resume from network_weights; strict errors; metadata and sshs hashes.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from library.config.network import NetworkConfig
from library.errors import ModelFileError
from library.models.tiny import build_tiny, resolve_model_ref
from library.networks.kohya import (load_kohya_file_into, load_kohya_into, metadata_for, module_names,
                                    network_state_dict_kohya, read_kohya, save_kohya)
from library.networks.lora import adapter_params, inject_network, param_groups

REFS = {"sd1": "tiny:sd15", "sdxl": "tiny:sdxl"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread


def perturb(network, seed: int = 0, scale: float = 0.1) -> None:
    """Non-zero adapters (peft starts the up / second factor at zero, i.e. an identity adapter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def inputs(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = model.tokenizers[0](["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=g)
    kw = {}
    if model.family == "sdxl":
        proj = model.text_encoders[1].config.projection_dim
        kw = {"added_cond_kwargs": {"text_embeds": torch.randn(1, proj, generator=g), "time_ids": torch.randn(1, 6, generator=g)}}
    return ids, x, ctx, kw


@torch.no_grad()
def outputs(unet, text_encoders, model_inputs):
    ids, x, ctx, kw = model_inputs
    te = [t(ids, output_hidden_states=True).hidden_states[-2] for t in text_encoders]
    return unet(x, 10, ctx, **kw).sample, te


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def pipe(request):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    family = request.param
    folder = resolve_model_ref(REFS[family])
    if family == "sdxl":
        return family, StableDiffusionXLPipeline.from_pretrained(folder)
    return family, StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


@pytest.mark.parametrize("conv_dim", [0, 2])
def test_diffusers_loads_kohya_and_matches(pipe, conv_dim, tmp_path):
    family, p = pipe
    model = build_tiny(family)
    base_out = outputs(model.unet, model.text_encoders, inputs(model))
    net = inject_network(model, NetworkConfig(network_dim=4, network_alpha=2.0, conv_dim=conv_dim, conv_alpha=1.0))
    perturb(net)
    ours = outputs(model.unet, model.text_encoders, inputs(model))
    path = tmp_path / "lora.safetensors"
    save_kohya(path, network_state_dict_kohya(model, net),
               metadata_for(family=family, v_prediction=False, network_module="locon" if conv_dim else "lora",
                            network_dim=4, network_alpha=2.0, title="t", network_args={"conv_dim": conv_dim}))
    p.load_lora_weights(str(path), adapter_name=f"a{conv_dim}")
    try:
        tes = [p.text_encoder] + ([p.text_encoder_2] if family == "sdxl" else [])
        theirs = outputs(p.unet, tes, inputs(model))
    finally:
        p.unload_lora_weights()
    assert max_diff(ours[0], base_out[0]) > 1e-2  # the adapters do change the outputs...
    assert max_diff(ours[0], theirs[0]) <= 1e-5  # ...and diffusers reproduces them
    for o, b, t in zip(ours[1], base_out[1], theirs[1]):
        assert max_diff(o, b) > 1e-2
        assert max_diff(o, t) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# LyCORIS types: names, readers' formulas, round trips (diffusers does not load LoHa / LoKr).


def reader_delta(t: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """The weight delta as A1111 / ComfyUI compute it from the file tensors of one module (independent of peft)."""
    alpha = t["alpha"].item()
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        if down.dim() == 4:
            d = (up.flatten(1) @ down.flatten(1)).reshape(shape)
        else:
            d = up @ down
        return d * alpha / down.shape[0]
    if "hada_w1_a" in t:
        w = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return w.reshape(shape) * alpha / t["hada_w1_b"].shape[0]
    dim = None
    w1 = t.get("lokr_w1")
    if w1 is None:
        w1, dim = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
    w2 = t.get("lokr_w2")
    if w2 is None:
        w2, dim = t["lokr_w2_a"] @ t["lokr_w2_b"], t["lokr_w2_b"].shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(shape) * (alpha / dim if dim is not None else 1.0)


LYCORIS_SUFFIXES = {
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
}


@pytest.mark.parametrize("module,extra", [
    ("loha", {}), ("lokr", {}), ("lokr", {"lokr_decompose_both": True, "network_dim": 2}), ("dora", {}),
])
def test_lycoris_files_round_trip_and_match_readers(module, extra, tmp_path):
    cfg = NetworkConfig(network_module=module, conv_dim=2, network_alpha=2.0, **({"network_dim": 4} | extra))
    model = build_tiny("sd1")
    net = inject_network(model, cfg)
    perturb(net, seed=3)
    if module == "dora":  # magnitudes near 1, not near 0 (a zero magnitude zeroes the layer)
        with torch.no_grad():
            for m in net.modules:
                adapter_params(m.layer, net.adapter_name)["lora_magnitude_vector"].add_(1.0)
    ours = outputs(model.unet, model.text_encoders, inputs(model))
    sd = network_state_dict_kohya(model, net)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        name, _, suffix = k.partition(".")
        by_module.setdefault(name, {})[suffix] = v
    assert all(set(t) <= LYCORIS_SUFFIXES[module] for t in by_module.values())
    if module == "lokr":
        assert any("lokr_w2" in t and "lokr_w1" in t for t in by_module.values()) or extra  # both-full case covered

    names = module_names(model, net)
    # DoRA merges per layer (slow): every 7th layer, which still spans Linear, 1x1 and 3x3 convs
    checked = sorted(by_module)[:: 7 if module == "dora" else 1]
    assert {names[n].kind for n in checked} == {"linear", "conv"}
    for name in checked:
        t = by_module[name]
        layer = names[name].layer
        base_w = layer.get_base_layer().weight
        if module == "dora":
            # DoRA (Liu et al. 2024, eq. 5): W' = m * (W + dW) / ||W + dW|| per output row, m = dora_scale [out, 1...]
            assert t["dora_scale"].shape == (base_w.shape[0],) + (1,) * (base_w.dim() - 1)
            merged = base_w + reader_delta(t, base_w.shape)
            norm = merged.flatten(1).norm(dim=1).reshape(t["dora_scale"].shape)
            layer.merge(adapter_names=[net.adapter_name])
            assert max_diff(layer.get_base_layer().weight, t["dora_scale"] * merged / norm) < 1e-5
            layer.unmerge()
        else:
            assert max_diff(reader_delta(t, base_w.shape), layer.get_delta_weight(net.adapter_name)) < 1e-6

    path = tmp_path / f"{module}.safetensors"
    save_kohya(path, sd, metadata_for(family="sd1", v_prediction=False, network_module=module, network_dim=4,
                                      network_alpha=2.0, title=module))
    # resume: network_weights loads the file into fresh adapters of the same configuration
    fresh = build_tiny("sd1")
    cfg.network_weights = str(path)
    load_kohya_file_into(fresh, inject_network(fresh, cfg), str(path))  # the caller loads it, as LoraTraining does
    again = outputs(fresh.unet, fresh.text_encoders, inputs(fresh))
    assert max_diff(ours[0], again[0]) <= 1e-6
    for a, b in zip(ours[1], again[1]):
        assert max_diff(a, b) <= 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Strictness, resume with a file alpha, metadata and hashes.


@pytest.fixture(scope="module")
def sd1_lora():
    model = build_tiny("sd1")
    net = inject_network(model, NetworkConfig(network_dim=4, network_alpha=2.0))
    perturb(net)
    return model, net, network_state_dict_kohya(model, net)


def test_load_errors_name_the_problem(sd1_lora):
    model, net, sd = sd1_lora
    bad = dict(sd, **{"lora_unet_nonexistent_layer.alpha": torch.tensor(1.0)})
    with pytest.raises(ModelFileError, match="lora_unet_nonexistent_layer"):
        load_kohya_into(model, net, bad)
    key = next(k for k in sd if k.endswith("lora_down.weight"))
    with pytest.raises(ModelFileError, match="shape"):
        load_kohya_into(model, net, dict(sd, **{key: torch.zeros(8, sd[key].shape[1])}))
    with pytest.raises(ModelFileError, match="lacks"):
        load_kohya_into(model, net, {k: v for k, v in sd.items() if not k.startswith(key.split(".")[0])})
    with pytest.raises(ModelFileError, match="SDXL"):
        load_kohya_into(model, net, {"lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)})
    with pytest.raises(ModelFileError, match="tensors"):
        load_kohya_into(model, net, dict(sd, **{key.replace("lora_down.weight", "hada_w1_a"): torch.zeros(1)}))


def test_file_alpha_wins_on_load(sd1_lora):
    model, net, sd = sd1_lora
    model2 = build_tiny("sd1")
    net2 = inject_network(model2, NetworkConfig(network_dim=4, network_alpha=1.0))
    load_kohya_into(model2, net2, sd)
    assert {m.alpha for m in net2.modules} == {2.0}
    assert max_diff(outputs(model.unet, [], inputs(model))[0], outputs(model2.unet, [], inputs(model2))[0]) <= 1e-6


def test_save_metadata_and_hashes(sd1_lora, tmp_path):
    model, net, sd = sd1_lora
    md = metadata_for(family="sd2", v_prediction=True, network_module="locon", network_dim=4, network_alpha=2.0,
                      title="my lora", network_args={"conv_dim": 2, "conv_alpha": 1}, resolution=(768, 768),
                      steps=10, tag_frequency={"10_cat": {"cat": 3}}, datasets=[{"num_train_images": 3}],
                      training_started_at=1700000000.0, config_text="[network]\nnetwork_dim = 4\n",
                      config_hash="0123456789abcdef")
    path = save_kohya(tmp_path / "x.safetensors", {k: v.half() for k, v in sd.items()}, md)
    tensors, meta = read_kohya(path)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0" and json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True"
    assert json.loads(meta["ss_tag_frequency"]) == {"10_cat": {"cat": 3}}
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.resolution"] == "768x768" and meta["modelspec.title"] == "my lora"
    assert meta["sdtk_config_hash"] == "0123456789abcdef"  # library.config.core.config_hash, given by the run
    assert meta["sdtk_config"] == "[network]\nnetwork_dim = 4\n"
    # sshs_model_hash: sha256 of everything after the safetensors header (A1111 additional-networks)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert len(meta["sshs_legacy_hash"]) == 8
    assert set(tensors) == set(sd) and tensors[next(iter(sd))].dtype == torch.float16
    # half-precision file loads back into the fp32 network
    load_kohya_into(model, net, tensors)
    load_kohya_into(model, net, sd)  # back to the fp32 values: the fixture is shared
    assert metadata_for(family="sdxl", v_prediction=False, network_module="loha", network_dim=4, network_alpha=1,
                        title="x")["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata_for(family="sd1", v_prediction=False, network_module="dora", network_dim=4, network_alpha=1,
                        title="x")["ss_network_module"] == "lycoris.kohya"


def test_save_refuses_unprefixed_keys_and_read_refuses_pickles(tmp_path):
    with pytest.raises(ModelFileError, match="prefix"):
        save_kohya(tmp_path / "x.safetensors", {"unet.foo.lora_down.weight": torch.zeros(1)}, {})
    with pytest.raises(ModelFileError, match="safetensors"):
        read_kohya(tmp_path / "x.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFileError, match="cannot read"):
        read_kohya(tmp_path / "junk.safetensors")


def test_resume_from_network_weights_and_continue_training(sd1_lora, tmp_path):
    model, net, sd = sd1_lora
    path = save_kohya(tmp_path / "resume.safetensors", sd, {"ss_steps": "10"})
    fresh = build_tiny("sd1")
    net2 = inject_network(fresh, NetworkConfig(network_dim=4, network_alpha=2.0, network_weights=str(path)))
    load_kohya_file_into(fresh, net2, str(path))  # the caller loads the file (as LoraTraining.setup does)
    x = inputs(fresh)
    assert max_diff(outputs(model.unet, model.text_encoders, x)[0], outputs(fresh.unet, fresh.text_encoders, x)[0]) <= 1e-6
    opt = torch.optim.SGD(param_groups(net2, base_lr=1e-2, unet_lr=None, te_lr=None), lr=1e-2)
    ids, lat, _, kw = x
    ctx = fresh.text_encoders[0](ids).last_hidden_state  # the last layer too, so every adapter gets a gradient
    loss = fresh.unet(lat, 10, ctx, **kw).sample.pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in net2.parameters())
    opt.step()
    after = network_state_dict_kohya(fresh, net2)
    assert set(after) == set(sd) and any(not torch.equal(after[k], sd[k]) for k in sd if k.endswith(".weight"))


def test_merge_and_extract_with_model_names(sd1_lora):
    """merge_lora on diffusers-named weights == the peft-adapted model; extracting the merged difference at the
    LoRA's rank gives back a file that loads into a fresh network and reproduces it."""
    from library.networks.kohya import kohya_weight_map, target_weight_map
    from library.networks.lora_tools import extract_lora, merge_lora

    model, net, sd = sd1_lora
    base = build_tiny("sd1")
    weights = {f"unet.{k}": v for k, v in base.unet.state_dict().items()}
    weights |= {f"text_encoder.{k}": v for k, v in base.text_encoders[0].state_dict().items()}
    merged = merge_lora(weights, sd, kohya_weight_map(base))
    x = inputs(base)
    want = outputs(model.unet, model.text_encoders, x)
    target = build_tiny("sd1")
    target.unet.load_state_dict({k[5:]: v for k, v in merged.items() if k.startswith("unet.")})
    target.text_encoders[0].load_state_dict({k[13:]: v for k, v in merged.items() if k.startswith("text_encoder.")})
    got = outputs(target.unet, target.text_encoders, x)
    assert max_diff(want[0], got[0]) <= 1e-5 and max_diff(want[1][0], got[1][0]) <= 1e-5

    cfg = NetworkConfig(network_dim=4, network_alpha=2.0)
    extracted = extract_lora(weights, merged, target_weight_map(base, cfg), rank=4, clamp_quantile=None, min_diff=0.0)
    assert set(extracted) == set(sd)
    fresh = build_tiny("sd1")
    net2 = inject_network(fresh, cfg)
    load_kohya_into(fresh, net2, extracted)
    again = outputs(fresh.unet, fresh.text_encoders, x)
    assert max_diff(want[0], again[0]) <= 1e-4 and max_diff(want[1][0], again[1][0]) <= 1e-4
