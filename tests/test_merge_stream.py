"""Streaming merge I/O and end-to-end merges of tiny models: the written files load in diffusers / safetensors and
hold exactly the formula applied to the inputs."""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from library.config.core import load_config
from library.config.merge import MergeRecipe
from library.errors import ModelFileError
from library.merge.blocks import block_slot, parse_block_alphas
from library.merge.run import run_recipe
from library.merge.stream import SafetensorsFile, open_source
from library.merge.writers import SafetensorsWriter
from library.models.keymaps import unet_key_map
from library.models.tiny import resolve_model_ref

from merge_models import main


def test_writer_round_trip_out_of_order(tmp_path):
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "c": torch.arange(77, dtype=torch.int64)[None],
        "empty": torch.zeros(0),
        "h": torch.randn(3, 1, 1, 1, generator=torch.Generator().manual_seed(0)).half(),
    }
    path = tmp_path / "x.safetensors"
    w = SafetensorsWriter(path, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, {"note": "hi"})
    for key in ["h", "c", "empty", "a", "b"]:  # any order: each lands at its offset
        w.write(key, tensors[key])
    w.close()
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"note": "hi"}
        assert set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v) and f.get_tensor(k).dtype == v.dtype
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0  # data area aligned as safetensors writes it
    ours = SafetensorsFile(path)
    assert torch.equal(ours.read("h"), tensors["h"]) and ours.read("empty").shape == (0,)
    ours.close()


def test_writer_checks(tmp_path):
    w = SafetensorsWriter(tmp_path / "y.safetensors", {"a": (torch.float16, (2,)), "b": (torch.float16, (1,))})
    with pytest.raises(ValueError, match="declared"):
        w.write("a", torch.zeros(2))  # float32, declared float16
    w.write("a", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match="never written"):
        w.close()


def _unet_sd(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()


@pytest.fixture(scope="module")
def tiny_pair():
    return resolve_model_ref("tiny:sd15:seed=1"), resolve_model_ref("tiny:sd15:seed=2")


def _recipe(tmp_path, **merge):
    out = merge.pop("out", str(tmp_path / "merged.safetensors"))
    extra = merge.pop("output", {})
    return load_config(MergeRecipe, {"merge": merge, "output": {"path": out, "precision": "fp32", **extra}})


def test_block_weighted_folder_output_equals_formula(tmp_path, tiny_pair):
    """A single-file A and a folder B merge into a diffusers folder that diffusers loads; every UNet weight is
    (1 - a_slot) A + a_slot B with the slot of its LDM key; the VAE and text encoder use BASE."""
    from diffusers import StableDiffusionPipeline

    from library.config.model import ModelConfig
    from library.models.load import load_model
    from library.models.single_file import save_single_file

    a_dir, b_dir = tiny_pair
    a_file = tmp_path / "a.safetensors"
    save_single_file(load_model(ModelConfig(pretrained_model_name_or_path=str(a_dir))), a_file, dtype=torch.float32)
    alphas = [0.1] + [round(i / 24, 6) for i in range(25)]
    cfg = _recipe(tmp_path, model_a=str(a_file), model_b=str(b_dir), block_alphas=alphas,
                  out=str(tmp_path / "merged"))
    out = run_recipe(cfg, "# recipe\n", progress=False)
    assert (out / "merge_recipe.toml").read_text() == "# recipe\n"
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    a_unet, b_unet = _unet_sd(a_dir), _unet_sd(b_dir)
    slots = parse_block_alphas(alphas, "sd1", 0.5, what="t")
    ldm = unet_key_map(pipe.unet.config)
    merged = pipe.unet.state_dict()
    for k, v in merged.items():
        a = slots[block_slot("model.diffusion_model." + ldm[k], "sd1")]
        torch.testing.assert_close(v, (1 - a) * a_unet[k] + a * b_unet[k], rtol=0, atol=1e-6)
    assert slots["IN00"] == 0.0 and slots["OUT11"] == 1.0
    assert torch.equal(merged["conv_in.weight"], a_unet["conv_in.weight"])
    assert torch.equal(merged["conv_out.weight"], b_unet["conv_out.weight"])
    from transformers import CLIPTextModel

    te_a = CLIPTextModel.from_pretrained(a_dir, subfolder="text_encoder").state_dict()
    te_b = CLIPTextModel.from_pretrained(b_dir, subfolder="text_encoder").state_dict()
    for k, v in pipe.text_encoder.state_dict().items():
        torch.testing.assert_close(v, 0.9 * te_a[k] + 0.1 * te_b[k], rtol=0, atol=1e-6)


def test_single_file_output_add_difference_fp16(tmp_path, tiny_pair):
    a_dir, b_dir = tiny_pair
    c_ref = "tiny:sd15"
    cfg = _recipe(tmp_path, mode="add_difference", model_a=str(a_dir), model_b=str(b_dir), model_c=c_ref, alpha=0.7,
                  output={"precision": "fp16"})
    out = run_recipe(cfg, "mode = 'add_difference'\n", progress=False)
    srcs = [open_source(str(a_dir)), open_source(str(b_dir)), open_source(c_ref)]
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["sdtk_merge_recipe"] == "mode = 'add_difference'\n"
        assert set(f.keys()) == set(srcs[0].keys())
        for k in ["model.diffusion_model.input_blocks.1.1.proj_in.weight", "first_stage_model.decoder.conv_in.bias",
                  "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"]:
            a, b, c = (s.get(k).float() for s in srcs)
            assert f.get_tensor(k).dtype == torch.float16
            assert torch.equal(f.get_tensor(k), (a + 0.7 * (b - c)).half())
        pos = "cond_stage_model.transformer.text_model.embeddings.position_ids"
        assert torch.equal(f.get_tensor(pos), torch.arange(77)[None])  # not merged, int64 kept
    for s in srcs:
        s.close()
    # the merged single file loads back through the toolkit's single-file loader
    from library.config.model import ModelConfig
    from library.models.single_file import load_single_file

    model = load_single_file(out, ModelConfig(config_dir=str(a_dir)))
    assert model.family == "sd1"


def test_family_mismatch_and_existing_output(tmp_path, tiny_pair, capsys):
    cfg = _recipe(tmp_path, model_a="tiny:sd15:seed=1", model_b="tiny:sdxl")
    with pytest.raises(ModelFileError, match=r"merge.model_b = 'tiny:sdxl' is an sdxl model .* sd1"):
        run_recipe(cfg, "", progress=False)
    (tmp_path / "exists.safetensors").write_bytes(b"")
    code = main(["--merge.model_a", "tiny:sd15:seed=1", "--merge.model_b", "tiny:sd15:seed=2",
                 "--output.path", str(tmp_path / "exists.safetensors"), "--no-progress"])
    assert code == 2 and "output.overwrite" in capsys.readouterr().err


def test_ties_via_cli_and_ckpt_input(tmp_path, tiny_pair):
    """TIES over a weights-only .ckpt base; the result is base + mean of agreeing trimmed deltas (density 1 -> no
    trim), checked on one tensor."""
    a_dir, b_dir = tiny_pair
    src = open_source(str(a_dir))
    ckpt = tmp_path / "base.ckpt"
    torch.save({"state_dict": {k: src.get(k).clone() for k in src.keys()}}, ckpt)
    out = tmp_path / "ties.safetensors"
    code = main(["--merge.mode", "ties", "--merge.model_a", str(ckpt), "--merge.models", f'["{b_dir}", "tiny:sd15"]',
                 "--merge.density", "1.0", "--output.path", str(out), "--output.precision", "fp32", "--no-progress"])
    assert code == 0
    key = "model.diffusion_model.middle_block.1.proj_out.weight"
    base, m1, m2 = src.get(key), open_source(str(b_dir)).get(key), open_source("tiny:sd15").get(key)
    d1, d2 = m1 - base, m2 - base
    sign = torch.sign(d1 + d2)
    agree1, agree2 = (torch.sign(d1) == sign) & (d1 != 0), (torch.sign(d2) == sign) & (d2 != 0)
    total = torch.where(agree1, d1, 0) + torch.where(agree2, d2, 0)
    want = base + total / (agree1.float() + agree2.float()).clamp_min(1)
    with safe_open(str(out), framework="pt") as f:
        torch.testing.assert_close(f.get_tensor(key), want, rtol=0, atol=1e-6)
        assert "ties" in f.metadata()["sdtk_merge_recipe"]


def test_quickstart_config(tmp_path):
    out = tmp_path / "qs"
    config = Path(__file__).resolve().parent.parent / "configs" / "quickstart_merge.toml"
    assert main(["--config", str(config), "--output.path", str(out), "--no-progress"]) == 0
    assert json.loads((out / "unet" / "config.json").read_text())["cross_attention_dim"] == 48
    assert 'block_alphas = "GRAD_V"' in (out / "merge_recipe.toml").read_text()


@pytest.mark.parametrize("ref,pipeline", [("tiny:sd2", "StableDiffusionPipeline"),
                                          ("tiny:sdxl", "StableDiffusionXLPipeline")])
def test_openclip_families_round_trip_to_diffusers(tmp_path, ref, pipeline):
    """SD2 / SDXL (OpenCLIP encoders: fused in_proj, SD2's padding layer): merging a model with itself through the
    single-file key space and back to a diffusers folder gives the model back, markers included."""
    import diffusers

    folder = resolve_model_ref(ref)
    cfg = _recipe(tmp_path, model_a=ref, model_b=str(folder), alpha=0.5, block_alphas="GRAD_V",
                  out=str(tmp_path / "out"))
    out = run_recipe(cfg, "", progress=False)
    merged = getattr(diffusers, pipeline).from_pretrained(out)
    orig = getattr(diffusers, pipeline).from_pretrained(folder)
    pairs = [("unet", merged.unet, orig.unet), ("te", merged.text_encoder, orig.text_encoder)]
    if ref == "tiny:sdxl":
        pairs.append(("te2", merged.text_encoder_2, orig.text_encoder_2))
    for name, m, o in pairs:
        msd, osd = m.state_dict(), o.state_dict()
        assert msd.keys() == osd.keys(), name
        for k in osd:  # (1 - a) x + a x is x up to float32 rounding
            torch.testing.assert_close(msd[k], osd[k], rtol=1e-6, atol=1e-7, msg=f"{name} {k}")
    assert merged.scheduler.config.prediction_type == orig.scheduler.config.prediction_type
