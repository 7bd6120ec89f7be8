"""merge_models.py on SD3 / SD3.5 (tiny:sd3 of different seeds): every checkpoint mode gives its formula on every
tensor, block weights follow the joint blocks, SD3 folders and single files (with and without text encoders) are
equal inputs, outputs load in our loader and diffusers, LoRAs of both SD3 layouts merge to what diffusers (or the
trained network) computes, extraction reproduces a difference and loads with diffusers' load_lora_weights."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from library.config.core import load_config
from library.config.merge import MergeRecipe
from library.config.model import ModelConfig
from library.errors import ConfigError, ModelFileError
from library.merge.blocks import block_slot, parse_block_alphas
from library.merge.run import run_recipe
from library.merge.stream import open_source
from library.models.sd3 import keymaps as km
from tests.test_sd3_lora import _outputs, _pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

A, B, C = "tiny:sd3:seed=1", "tiny:sd3:seed=2", "tiny:sd3:seed=3"
QKV = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"


def _run(tmp_path, name, **tables):
    tables["output"] = {"path": str(tmp_path / name), "precision": "fp32", **tables.get("output", {})}
    return run_recipe(load_config(MergeRecipe, tables), f"# {name}\n", progress=False)


def _tensors(ref):
    src = open_source(str(ref))
    try:
        return {k: src.get(k).clone() for k in src.keys()}
    finally:
        src.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_models):
    """The three tiny models' tensors in single-file keys, A also as a single file with and without text encoders."""
    from library.models.sd3.single_file import save_sd3_single_file

    tmp = tmp_path_factory.mktemp("sd3in")
    a_file, core = tmp / "a.safetensors", tmp / "a_core.safetensors"
    save_sd3_single_file(tiny_models("sd3", 1), a_file, dtype=torch.float32)
    from safetensors.torch import save_file

    with safe_open(str(a_file), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys() if not k.startswith(km.TE_PREFIXES)}, core)
    return {"a_file": a_file, "a_core": core, "A": _tensors(A), "B": _tensors(B), "C": _tensors(C)}


def _same_model_keys(got, want):
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].shape == v.shape, k


def test_folder_and_single_file_are_equal_views(inputs):
    """The tiny:sd3 folder read through the key maps is exactly the single file our writer makes of the model."""
    from_file = _tensors(inputs["a_file"])
    assert from_file.keys() == inputs["A"].keys()
    assert all(torch.equal(from_file[k], inputs["A"][k]) for k in from_file)
    assert from_file[QKV].shape == (192, 64)  # q, k, v fused, as in released files
    assert open_source(A).prediction_type == "flow" and open_source(A).family == "sd3"


def test_weighted_sum_exact_and_loads_in_our_loader_and_diffusers(tmp_path, inputs, tiny_models):
    """A single file (with text encoders) and a folder merge into a single file: (1 - a) A + a B on every tensor;
    our loader and diffusers' from_single_file read it."""
    from diffusers import SD3Transformer2DModel

    from library.models.load import load_model

    out = _run(tmp_path, "m.safetensors", merge={"model_a": str(inputs["a_file"]), "model_b": B, "alpha": 0.3})
    a, b = inputs["A"], inputs["B"]
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        got = {k: f.get_tensor(k) for k in f.keys()}
    _same_model_keys(got, a)
    for k in a:
        want = (0.7 * a[k].double() + 0.3 * b[k].double()).float()
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6, msg=k)  # float32 rounding (|T5 weights| < 5)
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium"
    assert meta["modelspec.prediction_type"] == "flow" and meta["sdtk_merge_recipe"] == "# m.safetensors\n"
    config_dir = tiny_models("sd3", 1).config_dir
    loaded = load_model(ModelConfig(pretrained_model_name_or_path=str(out), config_dir=str(config_dir)))
    assert loaded.family == "sd3" and len(loaded.text_encoders) == 3
    from library.models.sd3.single_file import model_to_sd3_file

    again = model_to_sd3_file(loaded)
    assert again.keys() == got.keys() and all(torch.equal(again[k], got[k]) for k in got)
    t = SD3Transformer2DModel.from_single_file(str(out), config=str(config_dir), subfolder="transformer",
                                               local_files_only=True, torch_dtype=torch.float32)
    ours = loaded.unet.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in t.state_dict().items())


def test_block_weighted_folder_output(tmp_path, inputs):
    """Per-slot alphas (BASE first, then the five embedders, joint_blocks.0-2, final_layer) land on their keys; the
    diffusers folder written loads in StableDiffusion3Pipeline and reads back as the same single-file tensors."""
    from diffusers import StableDiffusion3Pipeline

    alphas = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.0, 0.75, 1.0, 0.9]
    out = _run(tmp_path, "blocks", merge={"model_a": A, "model_b": B, "block_alphas": alphas})
    slots = parse_block_alphas(alphas, "sd3", 0.5, what="t", n_blocks=3)
    assert slots["joint_blocks.0"] == 0.0 and slots["joint_blocks.2"] == 1.0 and slots["final_layer"] == 0.9
    got, a, b = _tensors(out), inputs["A"], inputs["B"]
    _same_model_keys(got, a)
    seen = set()
    for k in a:
        slot = block_slot(k, "sd3")
        seen.add(slot)
        w = slots[slot]
        torch.testing.assert_close(got[k], (1 - w) * a[k] + w * b[k], rtol=0, atol=1e-6, msg=k)
    assert seen == set(slots)  # every slot has keys
    assert torch.equal(got[QKV], a[QKV])  # joint_blocks.0 at alpha 0: A bit for bit
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    assert pipe.text_encoder_3 is not None and (out / "merge_recipe.toml").is_file()


def test_add_difference_sum_twice_and_task_modes(tmp_path, inputs):
    a, b, c = inputs["A"], inputs["B"], inputs["C"]
    out = _run(tmp_path, "ad.safetensors", merge={"mode": "add_difference", "model_a": A, "model_b": B,
                                                  "model_c": C, "alpha": 0.7})
    got = _tensors(out)
    for k in a:
        torch.testing.assert_close(got[k], a[k] + 0.7 * (b[k] - c[k]), rtol=0, atol=1e-6, msg=k)
    out = _run(tmp_path, "st.safetensors", merge={"mode": "sum_twice", "model_a": A, "model_b": B, "model_c": C,
                                                  "alpha": 0.25, "beta": 0.5})
    got = _tensors(out)
    for k in a:
        want = 0.5 * (0.75 * a[k] + 0.25 * b[k]) + 0.5 * c[k]
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6, msg=k)
    # DARE at density 1 keeps every delta element: A + scale * sum_i w_i (M_i - A).
    out = _run(tmp_path, "dare.safetensors", merge={"mode": "dare", "model_a": A, "models": [B, C],
                                                    "weights": [0.5, 0.25], "density": 1.0, "scale": 0.8})
    got = _tensors(out)
    for k in a:
        want = a[k] + 0.8 * (0.5 * (b[k] - a[k]) + 0.25 * (c[k] - a[k]))
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6, msg=k)
    # TIES of one model at density 1: its delta elected whole, so the result is that model.
    got = _tensors(_run(tmp_path, "ties.safetensors", merge={"mode": "ties", "model_a": A, "models": [B],
                                                             "density": 1.0}))
    for k in a:
        torch.testing.assert_close(got[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_inputs_must_agree(tmp_path, inputs, capsys):
    from merge_models import main

    with pytest.raises(ModelFileError, match="merge.model_b = 'tiny:sd15' is an sd1 model but merge.model_a = "
                                             "'tiny:sd3:seed=1' is sd3"):
        _run(tmp_path, "x.safetensors", merge={"model_a": A, "model_b": "tiny:sd15"})
    rc = main(["--merge.model_a", "tiny:sd15", "--merge.model_b", A, "--output.path", str(tmp_path / "y.safetensors"),
               "--no_progress", "--no_prefetch"])
    err = capsys.readouterr().err
    assert rc != 0 and "error: merge.model_b = 'tiny:sd3:seed=1' is an sd3 model but merge.model_a = " \
                       "'tiny:sd15' is sd1" in err
    assert not (tmp_path / "y.safetensors").exists()
    assert main(["--merge.model_a", A, "--merge.model_b", B, "--output.path", str(tmp_path / "y.safetensors"),
                 "--dry-run", "--no_progress"]) == 0
    assert "2 inputs of family sd3 agree on 456 tensors" in capsys.readouterr().out
    assert not (tmp_path / "y.safetensors").exists()
    with pytest.raises(ModelFileError, match="holds the clip_l text encoder .* but .*a_core.safetensors does not"):
        _run(tmp_path, "z.safetensors", merge={"model_a": A, "model_b": str(inputs["a_core"])})
    with pytest.raises(ConfigError, match="takes 9 \\(pos_embed..final_layer"):
        _run(tmp_path, "w.safetensors", merge={"model_a": A, "model_b": B, "block_alphas": [0.5] * 25})


def test_files_without_text_encoders_merge_to_a_file_not_a_folder(tmp_path, inputs):
    core = str(inputs["a_core"])
    out = _run(tmp_path, "core.safetensors", merge={"model_a": core, "model_b": core, "alpha": 0.5})
    got = _tensors(out)
    assert not any(k.startswith(km.TE_PREFIXES) for k in got) and torch.equal(got[QKV], inputs["A"][QKV])
    with pytest.raises(ModelFileError, match="holds no CLIP text encoders .* write a single file"):
        _run(tmp_path, "core_dir", merge={"model_a": core, "model_b": core})
    assert not (tmp_path / "core_dir").exists()


def test_a_model_without_t5_writes_and_reads_a_folder_without_it(tmp_path, inputs, tiny_models):
    """Single files with CLIP but no T5 merge into a diffusers folder without text_encoder_3 / tokenizer_3 (null in
    model_index.json, as diffusers saves text_encoder_3=None); StableDiffusion3Pipeline loads it when told so, and
    the folder (an SD3 folder input without T5) reads back as the same single-file tensors."""
    import json

    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import save_file

    no_t5 = tmp_path / "no_t5.safetensors"
    with safe_open(str(inputs["a_file"]), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys() if not k.startswith(km.T5_PREFIX)}, no_t5)
    config_dir = tiny_models("sd3", 1).config_dir
    assert (config_dir / "text_encoder_3" / "config.json").is_file()  # left out because the model has no T5
    out = _run(tmp_path, "no_t5_dir", merge={"model_a": str(no_t5), "model_b": str(no_t5), "alpha": 0.5},
               output={"config_dir": str(config_dir)})
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    assert not (out / "text_encoder_3").exists() and not (out / "tokenizer_3").exists()
    # As for a folder diffusers saves without T5, the pipeline is told so (null components are not optional to it).
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and pipe.text_encoder_2 is not None and pipe.transformer is not None
    got = _tensors(out)
    want = {k: v for k, v in inputs["A"].items() if not k.startswith(km.T5_PREFIX)}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------------------------------------
# LoRA modes.


def _trained_lora(base, tmp_path, target="all_linear", seed=5):
    """A copy of `base` with a LoRA injected (random up weights, as after training), saved in both SD3 layouts as
    train_lora.py does: (model, {layout: path})."""
    from library.config.network import NetworkConfig
    from library.networks import sd3_keys
    from library.networks.lora import inject_network

    model = copy.deepcopy(base)
    network = inject_network(model, NetworkConfig(network_dim=4, network_alpha=2.0, target=target))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.modules:
            w = m.layer.lora_B[network.adapter_name].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.1)
    paths = {}
    for layout in ("diffusers", "sd_scripts"):
        paths[layout] = tmp_path / f"{layout}_{target}_{seed}.safetensors"
        sd3_keys.save_sd3_lora(paths[layout], sd3_keys.state_dict_sd3(model, network, layout, torch.float32),
                               sd3_keys.metadata_sd3(model, network, layout))
    return model, paths


def _loaded(path, config_dir):
    from library.models.load import load_model

    return load_model(ModelConfig(pretrained_model_name_or_path=str(path), config_dir=str(config_dir)))


def test_lora_merge_matches_diffusers_and_the_trained_network(tmp_path, tiny_models):
    """A diffusers-layout LoRA merged into A gives the outputs diffusers' load_lora_weights gives on A (to 1e-5);
    the sd-scripts layout (fused qkv, the last block's swapped adaLN rows) gives the trained network's outputs."""
    base = tiny_models("sd3", 1)
    trained, paths = _trained_lora(base, tmp_path)
    peft, kohya = paths["diffusers"], paths["sd_scripts"]
    pipe = _pipeline(copy.deepcopy(base))
    before = _outputs(pipe)
    pipe.load_lora_weights(str(peft))
    want_diffusers = _outputs(pipe)
    want_trained = _outputs(_pipeline(trained))
    for layout, path, want in (("diffusers", peft, want_diffusers), ("sd_scripts", kohya, want_trained)):
        out = _run(tmp_path, f"merged_{layout}.safetensors", merge={"mode": "lora_merge", "model_a": A},
                   lora=[{"path": str(path)}])
        got = _outputs(_pipeline(_loaded(out, base.config_dir)))
        for w, g, b in zip(want, got, before):
            assert not torch.allclose(w, b, atol=1e-4)  # the LoRA changes every output
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5, msg=layout)


def test_lora_merge_block_weights_strength_and_refusals(tmp_path, tiny_models):
    base = tiny_models("sd3", 1)
    peft = _trained_lora(base, tmp_path, target="attn_mlp")[1]["diffusers"]
    full = _tensors(_run(tmp_path, "full.safetensors", merge={"mode": "lora_merge", "model_a": A},
                         lora=[{"path": str(peft)}]))
    # Joint block 1 only (BASE, embedders and the other blocks 0), at strength 0.5: half of its delta.
    weights = [0, 0, 0, 0, 0, 0, 0, 1, 0, 0]
    half = _tensors(_run(tmp_path, "half.safetensors", merge={"mode": "lora_merge", "model_a": A},
                         lora=[{"path": str(peft), "strength": 0.5, "block_weights": weights}]))
    a = _tensors(A)
    changed = {block_slot(k, "sd3") for k in a if not torch.equal(full[k], a[k])}
    assert changed == {"BASE", "joint_blocks.0", "joint_blocks.1", "joint_blocks.2"}  # text encoders are BASE
    for k in a:
        want = a[k] + 0.5 * (full[k] - a[k]) if block_slot(k, "sd3") == "joint_blocks.1" else a[k]
        torch.testing.assert_close(half[k], want, rtol=0, atol=1e-6, msg=k)
    from library.networks.kohya import network_state_dict_kohya, save_kohya

    # An SD1 LoRA into SD3, and an SD3 LoRA into SD1, are refused naming the module.
    from library.config.network import NetworkConfig
    from library.networks.lora import inject_network

    sd1 = copy.deepcopy(tiny_models("sd1"))
    network = inject_network(sd1, NetworkConfig(network_dim=2, network_alpha=2.0))
    sd1_lora = save_kohya(tmp_path / "sd1.safetensors", network_state_dict_kohya(sd1, network), {})
    with pytest.raises(ModelFileError, match="sd1.safetensors: key 'lora_te_.* is not of an SD3 LoRA .*another "
                                             "family, SD1 / SD2 / SDXL"):
        _run(tmp_path, "x.safetensors", merge={"mode": "lora_merge", "model_a": A}, lora=[{"path": str(sd1_lora)}])
    unet_only = {k: v for k, v in network_state_dict_kohya(sd1, network).items() if k.startswith("lora_unet_")}
    unet_lora = save_kohya(tmp_path / "sd1_unet.safetensors", unet_only, {})
    with pytest.raises(ModelFileError, match="sd1_unet.safetensors: LoRA module lora_unet_down_blocks_.* has no layer "
                                             "in this SD3 model \\(a LoRA of another family"):
        _run(tmp_path, "x.safetensors", merge={"mode": "lora_merge", "model_a": A}, lora=[{"path": str(unet_lora)}])
    with pytest.raises(ModelFileError, match="diffusers_attn_mlp_5.safetensors is an SD3 LoRA .* but tiny:sd15 is an "
                                             "sd1 model: merge it into an SD3 checkpoint"):
        _run(tmp_path, "y.safetensors", merge={"mode": "lora_merge", "model_a": "tiny:sd15"},
             lora=[{"path": str(peft)}])


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_models):
    """B' = A with an attn_mlp LoRA merged in (a difference only in the layers an extracted LoRA adapts)."""
    tmp = tmp_path_factory.mktemp("tuned")
    base = tiny_models("sd3", 1)
    trained, paths = _trained_lora(base, tmp, target="attn_mlp", seed=7)
    out = _run(tmp, "tuned.safetensors", merge={"mode": "lora_merge", "model_a": A},
               lora=[{"path": str(paths["diffusers"])}])
    return out, trained


def test_extract_at_full_rank_reproduces_the_difference_in_diffusers(tmp_path, tuned, tiny_models):
    from library.networks import sd3_keys

    base = tiny_models("sd3", 1)
    tuned_file, trained = tuned
    lora = _run(tmp_path, "ex.safetensors", merge={"mode": "lora_extract", "model_a": A, "model_b": str(tuned_file)},
                extract={"rank": 256, "clamp_quantile": 1.0})
    with safe_open(str(lora), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert "text_encoder_2.text_model.encoder.layers.0.mlp.fc2.lora_B.weight" in keys
    assert meta["sdtk_lora_layout"] == "diffusers" and meta["ss_base_model_version"] == "5-medium"
    # The layers extracted are the ones SD3 LoRA training adapts (attn_mlp), in their diffusers names.
    want_layers = {f"transformer.{p}" for p in sd3_keys.select_sd3_targets(base.unet, "unet", "attn_mlp")}
    for i, te in enumerate(base.text_encoders[:2]):
        comp = ("text_encoder", "text_encoder_2")[i]
        want_layers |= {sd3_keys.diffusers_name(comp, p) for p in sd3_keys.select_sd3_targets(te, comp, "attn_mlp")}
    assert {k.rsplit(".lora_", 1)[0] for k in keys} == want_layers
    pipe = _pipeline(copy.deepcopy(base))
    pipe.load_lora_weights(str(lora))
    want = _outputs(_pipeline(trained))
    for w, g in zip(want, _outputs(pipe)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4)
    # Merged back into A, the extracted LoRA gives B' again.
    back = _tensors(_run(tmp_path, "back.safetensors", merge={"mode": "lora_merge", "model_a": A},
                         lora=[{"path": str(lora)}]))
    for k, v in _tensors(tuned_file).items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=1e-5, msg=k)


def test_extract_of_two_seeds_and_resize(tmp_path):
    """Full rank: every adapted layer's lora_B @ lora_A is B - A of that layer (q/k/v as rows of the fused qkv);
    a full-rank resize keeps every product, a rank-2 one keeps the layout and the rank."""
    from library.merge.sd3_lora import extract_targets, peft_modules
    from library.merge.lora_ops import layer_weight

    lora = _run(tmp_path, "ab.safetensors", merge={"mode": "lora_extract", "model_a": A, "model_b": B},
                extract={"rank": 256, "clamp_quantile": 1.0, "text_encoder": False})
    with safe_open(str(lora), "pt") as f:
        modules = peft_modules({k: f.get_tensor(k) for k in f.keys()}, lora)
    a, b = _tensors(A), _tensors(B)
    targets = extract_targets(a, text_encoders=False)
    assert set(modules) == set(targets) and targets["transformer.transformer_blocks.0.attn.to_k"] == (QKV, 1)
    for name, t in modules.items():
        key, block = targets[name]
        delta = t["lora_up.weight"] @ t["lora_down.weight"]
        torch.testing.assert_close(delta, layer_weight(b[key], block) - layer_weight(a[key], block),
                                   rtol=0, atol=1e-5, msg=name)
    full = _run(tmp_path, "rf.safetensors", merge={"mode": "lora_resize"}, extract={"rank": 256, "lora": str(lora)})
    small = _run(tmp_path, "r2.safetensors", merge={"mode": "lora_resize"}, extract={"rank": 2, "lora": str(lora)})
    with safe_open(str(full), "pt") as f:
        same = peft_modules({k: f.get_tensor(k) for k in f.keys()}, full)
    with safe_open(str(small), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "2" and f.metadata()["sdtk_lora_layout"] == "diffusers"
        assert f.get_tensor("transformer.transformer_blocks.0.attn.to_q.lora_A.weight").shape[0] == 2
    for name, t in modules.items():
        torch.testing.assert_close(same[name]["lora_up.weight"] @ same[name]["lora_down.weight"],
                                   t["lora_up.weight"] @ t["lora_down.weight"], rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="adapts no convolutions"):
        _run(tmp_path, "conv.safetensors", merge={"mode": "lora_extract", "model_a": A, "model_b": B},
             extract={"conv_rank": 4})
