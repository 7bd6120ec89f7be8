"""Bundled configs, the CLIP vocabulary, tiny models and `tiny:` references (library/models/configs, tiny.py)."""

import copy
import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library.errors import ConfigError
from library.models.configs import BUNDLED, bundled_config_dir, bundled_config_for
from library.models.tiny import TinyRef, build_tiny, parse_tiny_ref, resolve_model_ref

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_clip_vocab", REPO / "tools" / "make_clip_vocab.py")
make_clip_vocab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_clip_vocab)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread


def _json(path):
    return json.loads(Path(path).read_text())


# --- bundled configs and tokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd15/tokenizer", "sd21/tokenizer", "sd21_base/tokenizer", "sdxl/tokenizer",
                                  "sdxl/tokenizer_2"])
def test_bundled_tokenizers_give_sd_token_ids(name):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(bundled_config_dir(name.split("/")[0]) / name.split("/")[1])
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    pads_with_bang = name in ("sd21/tokenizer", "sd21_base/tokenizer", "sdxl/tokenizer_2")
    assert tok.pad_token_id == (0 if pads_with_bang else 49407)
    # Lower-casing and punctuation split as CLIP's tokenizer does. Where "!" is the pad token it is a special token,
    # so a "!" in a caption becomes id 0 instead of "!</w>" (256) -- as with the released SD2 / SDXL tokenizer_2.
    bang = 0 if pads_with_bang else 256
    assert tok("A PHOTO, of a Cat!").input_ids == [49406, 320, 1125, 267, 539, 320, 2368, bang, 49407]


def test_clip_vocab_derivation():
    symbols = make_clip_vocab.byte_symbols()
    assert len(symbols) == len(set(symbols)) == 256
    assert symbols[:3] == ["!", '"', "#"] and symbols[188] == "Ā"  # byte 0 -> U+0100, after the 188 printable
    vocab = make_clip_vocab.build_vocab([("i", "n"), ("t", "h")] + [(f"x{i}", "y") for i in range(48892)])
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["in"] == 512 and vocab["th"] == 513
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    stored = _json(REPO / "library/models/configs/clip_tokenizer/vocab.json")
    assert len(stored) == 49408 and stored["cat</w>"] == 2368 and stored["in"] == 512
    merges = (REPO / "library/models/configs/clip_tokenizer/merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2" and merges[1] == "i n" and len(merges) == 1 + 48894


def test_make_clip_vocab_rejects_a_short_merge_list(tmp_path):
    bad = tmp_path / "bpe.txt.gz"
    bad.write_bytes(gzip.compress(b"#version: 0.2\ni n\n"))
    with pytest.raises(ValueError, match="not a CLIP BPE merge list"):
        make_clip_vocab.read_merges(bad)


def test_bundled_configs_hold_the_released_values():
    sd15, sd21, base, xl = (bundled_config_dir(n) for n in ("sd15", "sd21", "sd21_base", "sdxl"))
    assert BUNDLED == ("sd15", "sd21", "sd21_base", "sdxl", "sd3_medium", "sd35_medium", "sd35_large")
    assert bundled_config_dir("sd1") == sd15 and bundled_config_for("sd2", "epsilon") == base
    assert bundled_config_for("sd2", "v_prediction") == sd21
    assert bundled_config_dir("sd3") == bundled_config_dir("sd35_medium")  # the family name picks SD3.5 Medium
    with pytest.raises(KeyError):
        bundled_config_dir("sd4")
    u = _json(sd15 / "unet/config.json")
    assert (u["cross_attention_dim"], u["attention_head_dim"], u.get("use_linear_projection", False)) == (768, 8, False)
    u = _json(sd21 / "unet/config.json")
    assert (u["cross_attention_dim"], u["attention_head_dim"], u["use_linear_projection"]) == (1024, [5, 10, 20, 20], True)
    assert u["sample_size"] == 96 and _json(base / "unet/config.json")["sample_size"] == 64
    u = _json(xl / "unet/config.json")
    assert u["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert (u["cross_attention_dim"], u["addition_embed_type"], u["addition_time_embed_dim"]) == (2048, "text_time", 256)
    assert u["projection_class_embeddings_input_dim"] == 1280 + 6 * 256
    assert u["transformer_layers_per_block"] == [1, 2, 10]
    te = [_json(d / "text_encoder/config.json") for d in (sd15, sd21)] + [_json(xl / "text_encoder_2/config.json")]
    assert [(t["hidden_act"], t["hidden_size"], t["num_hidden_layers"], t["projection_dim"]) for t in te] == [
        ("quick_gelu", 768, 12, 768), ("gelu", 1024, 23, 512), ("gelu", 1280, 32, 1280)]
    assert _json(sd21 / "scheduler/scheduler_config.json")["prediction_type"] == "v_prediction"
    assert _json(base / "scheduler/scheduler_config.json")["prediction_type"] == "epsilon"
    assert _json(xl / "vae/config.json")["scaling_factor"] == 0.13025
    assert _json(sd15 / "vae/config.json")["scaling_factor"] == 0.18215


def test_bundled_configs_build_models_of_the_released_size():
    # Parameter counts of the released SD1.5 (UNet 859.52M, CLIP ViT-L text 123.06M); SD2 / SDXL counts were checked
    # the same way by hand (865,910,724 / 2,567,463,684 UNet) but take ~20 s more on the meta device.
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        for name, n_unet, n_te in (("sd15", 859_520_964, 123_060_480),):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(bundled_config_dir(name) / "unet"))
            te = CLIPTextModel(CLIPTextConfig.from_pretrained(bundled_config_dir(name) / "text_encoder"))
            assert sum(p.numel() for p in unet.parameters()) == n_unet
            assert sum(p.numel() for p in te.parameters()) == n_te


# --- tiny models -------------------------------------------------------------------------------------------------


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_build_tiny_is_deterministic_and_seeded(family):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = build_tiny(family, seed=0), build_tiny(family, seed=0), build_tiny(family, seed=1)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is left alone
    for name in ("unet", "vae"):
        assert _same(getattr(a, name), getattr(b, name))
        assert not _same(getattr(a, name), getattr(c, name))
    for ta, tb, tc in zip(a.text_encoders, b.text_encoders, c.text_encoders):
        assert _same(ta, tb) and not _same(ta, tc)
    assert a.family == family and a.source == "tiny:" + {"sd1": "sd15", "sd2": "sd2", "sdxl": "sdxl"}[family]
    assert a.prediction_type == {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon"}[family]
    assert a.scheduler_config["prediction_type"] == a.prediction_type
    assert (a.config_dir / "unet" / "config.json").is_file()  # a folder describing the tiny model itself
    assert _json(a.config_dir / "unet" / "config.json")["block_out_channels"] == list(a.unet.config.block_out_channels)


def test_tiny_models_keep_the_released_block_structure():
    def down_keys(unet):
        return {k.split(".weight")[0] for k in unet.state_dict() if k.startswith(("down_blocks", "up_blocks"))}

    sd1, sd2, xl = build_tiny("sd1"), build_tiny("sd2"), build_tiny("sdxl")
    for m in (sd1, sd2):
        keys = down_keys(m.unet)
        assert len(m.unet.down_blocks) == len(m.unet.up_blocks) == 4
        # Channel changes where the released UNet has them, so the same resnets carry a shortcut convolution.
        assert {"down_blocks.1.resnets.0.conv_shortcut", "down_blocks.2.resnets.0.conv_shortcut"} <= keys
        assert "down_blocks.3.resnets.0.conv_shortcut" not in keys
        assert "down_blocks.3.attentions.0.proj_in" not in keys  # lowest level has no attention (DownBlock2D)
    assert sd1.unet.down_blocks[0].attentions[0].proj_in.__class__.__name__ == "Conv2d"
    assert sd2.unet.down_blocks[0].attentions[0].proj_in.__class__.__name__ == "Linear"
    assert len(xl.unet.down_blocks) == 3 and not hasattr(xl.unet.down_blocks[0], "attentions")
    assert xl.unet.config.addition_embed_type == "text_time"
    assert len(xl.unet.down_blocks[2].attentions[0].transformer_blocks) == 2
    assert [type(t).__name__ for t in xl.text_encoders] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert [t.config.hidden_act for t in (sd1.text_encoders[0], sd2.text_encoders[0])] == ["quick_gelu", "gelu"]
    assert list(sd1.vae.config.block_out_channels) == [16, 32, 32, 32]
    for m in (sd1, sd2, xl):
        # Small enough for a millisecond-scale CPU step (v1 had ~8.5 M), and text widths apart from every UNet width
        # (A1111 hypernetworks pick their layers by context width).
        assert sum(p.numel() for p in m.unet.parameters()) < 2_500_000
        widths = set(m.unet.config.block_out_channels)
        assert widths.isdisjoint(t.config.hidden_size for t in m.text_encoders)
        assert m.unet.config.cross_attention_dim not in widths
    latents = sd1.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)


def test_tiny_ref_parsing():
    assert parse_tiny_ref("tiny:sd15") == TinyRef("sd1", 0, "epsilon")
    assert parse_tiny_ref("tiny:sd1:seed=2") == TinyRef("sd1", 2, "epsilon")
    assert parse_tiny_ref("tiny:sd2:prediction=epsilon,seed=3") == TinyRef("sd2", 3, "epsilon")
    assert parse_tiny_ref("tiny:sdxl:prediction=v") == TinyRef("sdxl", 0, "v_prediction")
    assert parse_tiny_ref("tiny:sd2").name == "sd2"
    assert parse_tiny_ref("tiny:sd2:prediction=epsilon,seed=3").name == "sd2-seed3-epsilon"
    assert parse_tiny_ref("tiny:sd3:seed=1") == TinyRef("sd3", 1, "flow")
    for bad in ("tiny:sd4", "tiny:sd3:prediction=epsilon", "tiny:sd15:seed=x", "tiny:sd15:colour=red", "tiny"):
        with pytest.raises(ConfigError, match="accepted: tiny:sd15"):
            parse_tiny_ref(bad)


def test_tiny_refs_are_built_once_and_reused(tmp_path, monkeypatch):
    import library.models.tiny as tiny

    monkeypatch.setenv("SDTK_CACHE", str(tmp_path))
    folder = resolve_model_ref("tiny:sd15:seed=5")
    assert folder == tmp_path / "tiny" / f"v{tiny.TINY_VERSION}" / "sd15-seed5"
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    stamp = (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns

    def no_rebuild(*a, **k):
        raise AssertionError("rebuilt a cached tiny model")

    monkeypatch.setattr(tiny, "build_tiny", no_rebuild)
    assert resolve_model_ref("tiny:sd1:seed=5") == folder
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in folder.parent.iterdir() if ".build-" in p.name]  # no staging folders left


def test_a_lost_build_race_keeps_the_winners_folder(tmp_path):
    import library.models.tiny as tiny

    final = tmp_path / "m"
    final.mkdir()
    (final / "model_index.json").write_text("{}")
    staging = tmp_path / ".m.build-1"
    staging.mkdir()
    (staging / "model_index.json").write_text('{"loser": 1}')
    tiny._publish(staging, final)
    assert (final / "model_index.json").read_text() == "{}" and not staging.exists()


def test_library_tiny_writes_folders_diffusers_pipelines_load(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from library.tiny import main

    for family, pipeline_cls in (("sd15", StableDiffusionPipeline), ("sdxl", StableDiffusionXLPipeline)):
        out = tmp_path / family
        assert main(["--family", family, "--seed", "3", "--out", str(out)]) == 0
        assert f"wrote tiny {family}" in capsys.readouterr().out
        pipe = pipeline_cls.from_pretrained(out, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        assert _same(pipe.unet, build_tiny({"sd15": "sd1", "sdxl": "sdxl"}[family], seed=3).unet)
        image = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
        assert image.shape == (1, 64, 64, 3) and float(image.std()) > 0


def test_library_tiny_writes_an_sd3_folder_diffusers_loads(tmp_path, capsys):
    from diffusers import StableDiffusion3Pipeline

    from library.tiny import main

    assert main(["--family", "sd3", "--seed", "3", "--out", str(tmp_path / "sd3")]) == 0
    assert "wrote tiny sd3 model (flow, seed 3)" in capsys.readouterr().out
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "sd3", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert _same(pipe.transformer, build_tiny("sd3", seed=3).unet)
    image = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                 max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and float(image.std()) > 0


def test_library_tiny_rejects_an_unknown_family(tmp_path):
    run = subprocess.run([sys.executable, "-m", "library.tiny", "--family", "sd4", "--out", str(tmp_path / "x")],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2 and "invalid choice" in run.stderr


# --- the tiny VAE's colour codec (library/models/tiny_vae.py) -----------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_tiny_vae_round_trips_the_8x8_block_colours(family):
    """Encoding then decoding gives each 8x8 block's mean colour (so colours survive), latents * scaling_factor are
    the documented colour transform, and sampling the latent distribution adds (almost) nothing."""
    from library.models.tiny_vae import LATENT_STD

    vae = build_tiny(family).vae
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 96, generator=g) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        mosaic = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 8), scale_factor=8)
        assert torch.allclose(vae.decode(dist.mean).sample, mosaic, atol=1e-4)
        assert torch.allclose(vae.decode(dist.sample(generator=g)).sample, mosaic, atol=1e-4)
        red = torch.tensor([220, 40, 40]).div(127.5).sub(1).view(1, 3, 1, 1).expand(1, 3, 64, 64)
        z = vae.encode(red).latent_dist.mean * vae.config.scaling_factor
    r, gr, b = red[0, :, 0, 0].tolist()
    expected = [(r + gr + b) / 3 ** 0.5, (r - b) / 2 ** 0.5, (r - 2 * gr + b) / 6 ** 0.5, (gr - b) / 2 ** 0.5]
    assert torch.allclose(z[0, :, 0, 0], torch.tensor(expected) * LATENT_STD, atol=1e-4)


def test_tiny_vae_codec_survives_fp16_and_bf16():
    """Checkpoints are saved in fp16/bf16 and VAEs run in half precision: the codec's small weights keep colours
    within a few levels of 255 there too."""
    vae = build_tiny("sd1").vae
    x = torch.tensor([[220, 40, 40], [40, 90, 230]]).div(127.5).sub(1).view(2, 3, 1, 1).expand(2, 3, 64, 64)
    for dtype in (torch.float16, torch.bfloat16):
        half = copy.deepcopy(vae).to(dtype)
        with torch.no_grad():
            out = half.decode(half.encode(x.to(dtype)).latent_dist.mean).sample.float()
        assert (out - x).abs().max() * 127.5 < 4, dtype
