"""LoRA modes of merge_models.py on tiny SD1 models: extract (B - A) at full rank, merge it back into A -> B; block
weights; resize keeps the product at full rank; a LoRA of another family, or an empty one, is refused."""

import pytest
import torch
from safetensors import safe_open

from library.config.core import load_config
from library.config.merge import MergeRecipe
from library.errors import ModelFileError
from library.merge.run import run_recipe
from library.merge.stream import open_source
from library.networks.lora_tools import group_modules, lora_delta

A, B = "tiny:sd15:seed=1", "tiny:sd15:seed=2"
ATTN = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
TE = "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"
NORM = "model.diffusion_model.input_blocks.1.1.norm.weight"


def _run(tmp_path, name, **tables):
    tables.setdefault("output", {})
    tables["output"] = {"path": str(tmp_path / name), "precision": "fp32", **tables["output"]}
    return run_recipe(load_config(MergeRecipe, tables), f"# {name}\n", progress=False)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    return _run(tmp, "full.safetensors", merge={"mode": "lora_extract", "model_a": A, "model_b": B},
                extract={"rank": 256, "clamp_quantile": 1.0})


def test_extract_then_merge_recovers_b(tmp_path, extracted):
    with safe_open(str(extracted), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["ss_network_module"] == "networks.lora" and f.metadata()["sdtk_config"] == "# full.safetensors\n"
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_1_self_attn_q_proj.alpha" in keys
    out = _run(tmp_path, "merged.safetensors", merge={"mode": "lora_merge", "model_a": A},
               lora=[{"path": str(extracted)}])
    a, b = open_source(A), open_source(B)
    with safe_open(str(out), framework="pt") as f:
        for key in (ATTN, TE):
            torch.testing.assert_close(f.get_tensor(key), b.get(key), rtol=0, atol=1e-5)
        assert torch.equal(f.get_tensor(NORM), a.get(NORM))  # not a LoRA target: A's weight, bit for bit
    # block weights: UNet slots 0 (ALL_A preset), BASE (text encoder) at strength 0.5
    out = _run(tmp_path, "blocks.safetensors", merge={"mode": "lora_merge", "model_a": A},
               lora=[{"path": str(extracted), "strength": 0.5, "block_weights": "ALL_A"}])
    with safe_open(str(out), framework="pt") as f:
        assert torch.equal(f.get_tensor(ATTN), a.get(ATTN))
        torch.testing.assert_close(f.get_tensor(TE), (a.get(TE) + b.get(TE)) / 2, rtol=0, atol=1e-5)


def test_resize_keeps_product_at_full_rank(tmp_path, extracted):
    out = _run(tmp_path, "r.safetensors", merge={"mode": "lora_resize"}, extract={"rank": 2, "lora": str(extracted)})
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor(f"{name}.lora_down.weight").shape[0] == 2
        assert f.metadata()["ss_network_dim"] == "2" and f.metadata()["sdtk_merge_recipe"] == "# r.safetensors\n"
        small = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(extracted), framework="pt") as f:
        old = {k: f.get_tensor(k) for k in f.keys()}
    assert small.keys() == old.keys()  # every module resized, none dropped
    # At full rank the resize is lossless: every module's product (scale included) is the extracted one.
    full = _run(tmp_path, "f.safetensors", merge={"mode": "lora_resize"}, extract={"rank": 256, "lora": str(extracted)})
    with safe_open(str(full), framework="pt") as f:
        same = {k: f.get_tensor(k) for k in f.keys()}
    old_m, small_m, same_m = group_modules(old), group_modules(small), group_modules(same)
    for module, t in old_m.items():
        shape = (t["lora_up.weight"].shape[0], *t["lora_down.weight"].shape[1:])
        delta = lora_delta(t, shape)
        torch.testing.assert_close(lora_delta(same_m[module], shape), delta, rtol=0, atol=1e-5)
    # At rank 2 it is the best rank-2 approximation of the product (Eckart-Young), not just any rank-2 pair.
    t = old_m[name]
    shape = (t["lora_up.weight"].shape[0], *t["lora_down.weight"].shape[1:])
    delta = lora_delta(t, shape)
    error = (lora_delta(small_m[name], shape) - delta).flatten(1).norm().item()
    assert error == pytest.approx(torch.linalg.svdvals(delta.flatten(1))[2:].norm().item(), rel=1e-4)


def test_lora_of_other_family_refused(tmp_path, extracted):
    with pytest.raises(ModelFileError, match="no layer in the sdxl model"):
        _run(tmp_path, "x.safetensors", merge={"mode": "lora_merge", "model_a": "tiny:sdxl"},
             lora=[{"path": str(extracted)}])


@pytest.mark.parametrize("model, words", [(A, "holds no LoRA modules"), ("tiny:sd3", "holds no tensors")])
def test_an_empty_lora_file_is_refused_by_name(tmp_path, model, words):
    """Not merged as nothing (SD1), nor an IndexError (SD3): one message naming the file."""
    from safetensors.torch import save_file

    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    with pytest.raises(ModelFileError, match=rf"empty\.safetensors.*{words}"):
        _run(tmp_path, "x.safetensors", merge={"mode": "lora_merge", "model_a": model}, lora=[{"path": str(empty)}])
    assert not (tmp_path / "x.safetensors").exists()
