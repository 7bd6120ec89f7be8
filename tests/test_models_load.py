"""Loading models from folders and references, and saving diffusers folders (library/models/load.py, save.py)."""

import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.config.model import ModelConfig
from library.errors import ConfigError, ModelFileError
from library.models.configs import bundled_config_dir
from library.models.load import detect_family, load_model, load_vae
from library.models.save import save_diffusers
from library.models.text import encode_text, tokenize, unet_forward, sdxl_time_ids
from library.models.tiny import build_tiny


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread


def _json(path):
    return json.loads(path.read_text())


def _outputs(model):
    """Text conditioning, UNet prediction and VAE decode for fixed inputs: equal outputs = equal model."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        cond = encode_text(model, tokenize(model, ["a photo of a cat"]))
        ids = sdxl_time_ids([(64, 64)], [(0, 0)], [(64, 64)]) if model.family == "sdxl" else None
        pred = unet_forward(model, latents, torch.tensor([321]), cond, ids)
        image = model.vae.decode(latents).sample
    return [cond.hidden, pred, image] + ([cond.pooled] if cond.pooled is not None else [])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_save_diffusers_round_trip_gives_identical_outputs(tmp_path, family):
    model = build_tiny(family, seed=7)
    out = save_diffusers(model, tmp_path / "model", dtype=torch.float32)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic: no temporary left
    for te_dir in ["text_encoder", "text_encoder_2"][: len(model.text_encoders)]:
        keys = load_file(out / te_dir / "model.safetensors").keys()
        assert keys and all(k.startswith(("text_model.", "text_projection.")) for k in keys)
        assert "text_model.final_layer_norm.weight" in keys
    index = _json(out / "model_index.json")
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "tokenizer" / "merges.txt").is_file()
    loaded = load_model(ModelConfig(pretrained_model_name_or_path=str(out)))
    assert (loaded.family, loaded.prediction_type, loaded.config_dir) == (family, model.prediction_type, out)
    for a, b in zip(_outputs(model), _outputs(loaded)):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in loaded.unet.parameters())


def test_save_diffusers_in_half_precision_and_model_untouched(tmp_path):
    model = build_tiny("sd1")
    save_diffusers(model, tmp_path / "half", dtype=torch.float16)
    assert model.unet.dtype == torch.float32  # weights converted copy by copy
    weights = load_file(tmp_path / "half" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float16}
    loaded = load_model(ModelConfig(pretrained_model_name_or_path=str(tmp_path / "half")), dtype=torch.float16)
    assert loaded.unet.dtype == loaded.text_encoders[0].dtype == torch.float16
    w = "down_blocks.0.resnets.0.conv1.weight"
    assert torch.equal(loaded.unet.state_dict()[w], model.unet.state_dict()[w].half())


def test_transformers_reads_text_encoders_with_and_without_the_prefix(tmp_path):
    from transformers import CLIPTextModel

    te = build_tiny("sd1").text_encoders[0]
    plain = te.state_dict()
    assert not any(k.startswith("text_model.") for k in plain)  # transformers 5's own naming
    for name, state in (("prefixed", {"text_model." + k: v for k, v in plain.items()}), ("plain", plain)):
        folder = tmp_path / name
        te.config.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", {"format": "pt"})
        again = CLIPTextModel.from_pretrained(folder)
        assert all(torch.equal(again.state_dict()[k], plain[k]) for k in plain), name


def test_tiny_refs_load_with_family_and_prediction():
    sd2 = load_model(ModelConfig(pretrained_model_name_or_path="tiny:sd2"))
    assert (sd2.family, sd2.prediction_type, sd2.source) == ("sd2", "v_prediction", "tiny:sd2")
    assert sd2.scheduler_config["prediction_type"] == "v_prediction"
    eps = load_model(ModelConfig(pretrained_model_name_or_path="tiny:sd2", prediction_type="epsilon"))
    assert eps.prediction_type == eps.scheduler_config["prediction_type"] == "epsilon"
    v = load_model(ModelConfig(pretrained_model_name_or_path="tiny:sd15", v_parameterization=True))
    assert (v.family, v.prediction_type) == ("sd1", "v_prediction")
    xl = load_model(ModelConfig(pretrained_model_name_or_path="tiny:sdxl"))
    assert xl.family == "sdxl" and len(xl.text_encoders) == len(xl.tokenizers) == 2


def test_family_detection_from_folder_configs(tmp_path):
    for name, family in (("sd15", "sd1"), ("sd21", "sd2"), ("sd21_base", "sd2"), ("sdxl", "sdxl")):
        folder = bundled_config_dir(name)
        assert detect_family(_json(folder / "model_index.json"), _json(folder / "unet" / "config.json")) == family
    # Tiny or unusual widths: SDXL by its text_time conditioning, SD2 by linear projections.
    assert detect_family({}, {"cross_attention_dim": 48, "use_linear_projection": False}) == "sd1"
    assert detect_family({}, {"cross_attention_dim": 80, "use_linear_projection": True}) == "sd2"
    assert detect_family({}, {"cross_attention_dim": 144, "addition_embed_type": "text_time"}) == "sdxl"


def test_prediction_type_and_zero_snr_marker_come_from_the_scheduler_config(tmp_path):
    out = save_diffusers(build_tiny("sd2", prediction_type="epsilon"), tmp_path / "m", dtype=torch.float32)
    path = out / "scheduler" / "scheduler_config.json"
    assert _json(path)["prediction_type"] == "epsilon"
    assert load_model(ModelConfig(pretrained_model_name_or_path=str(out))).prediction_type == "epsilon"
    path.write_text(json.dumps({**_json(path), "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}))
    model = load_model(ModelConfig(pretrained_model_name_or_path=str(out)))
    assert model.prediction_type == "v_prediction" and model.extra["zero_terminal_snr"] is True
    path.write_text(json.dumps({**_json(path), "prediction_type": "sample"}))
    with pytest.raises(ModelFileError, match="prediction_type 'sample' is not supported"):
        load_model(ModelConfig(pretrained_model_name_or_path=str(out)))


def test_bad_paths_name_the_path_and_what_is_accepted(tmp_path):
    with pytest.raises(ModelFileError) as e:
        load_model(ModelConfig(pretrained_model_name_or_path=str(tmp_path / "nope.safetensors")))
    assert str(tmp_path / "nope.safetensors") in str(e.value) and "tiny:sd15" in str(e.value)
    with pytest.raises(ModelFileError, match="model hub names are not downloaded"):
        load_model(ModelConfig(pretrained_model_name_or_path="runwayml/stable-diffusion-v1-5"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelFileError, match="is not a model file"):
        load_model(ModelConfig(pretrained_model_name_or_path=str(tmp_path / "notes.txt")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="missing unet/config.json"):
        load_model(ModelConfig(pretrained_model_name_or_path=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="accepted: tiny:sd15"):
        load_model(ModelConfig(pretrained_model_name_or_path="tiny:sd9"))


def test_an_incomplete_folder_names_the_missing_part(tmp_path):
    out = save_diffusers(build_tiny("sdxl"), tmp_path / "xl", dtype=torch.float32)
    import shutil

    shutil.rmtree(out / "text_encoder_2")
    with pytest.raises(ModelFileError, match="missing text_encoder_2/config.json"):
        load_model(ModelConfig(pretrained_model_name_or_path=str(out)))


def test_single_files_go_to_the_single_file_loader(tmp_path, monkeypatch):
    ckpt = tmp_path / "model.safetensors"
    save_file({"cond_stage_model.transformer.text_model.x": torch.zeros(1)}, str(ckpt))  # a header that is not SD3's
    tiny = build_tiny("sd1")
    seen = []

    def fake_load_single_file(path, cfg):
        seen.append((path, cfg.clip_skip))
        return tiny

    monkeypatch.setitem(sys.modules, "library.models.single_file",
                        types.SimpleNamespace(load_single_file=fake_load_single_file))
    model = load_model(ModelConfig(pretrained_model_name_or_path=str(ckpt), clip_skip=2,
                                   prediction_type="v_prediction"), dtype=torch.bfloat16)
    assert seen == [(ckpt, 2)]
    assert model.prediction_type == "v_prediction" and model.unet.dtype == torch.bfloat16


def test_replacement_vae_from_folder_and_file(tmp_path):
    donor = build_tiny("sd1", seed=9)
    save_diffusers(donor, tmp_path / "donor", dtype=torch.float32)
    save_file(dict(donor.vae.state_dict()), tmp_path / "vae.safetensors")
    base = build_tiny("sd1")
    expected = donor.vae.state_dict()
    # (a random weight: the tiny VAE's colour-codec path is the same for every seed)
    assert not torch.equal(expected["decoder.mid_block.resnets.0.conv1.weight"], base.vae.state_dict()["decoder.mid_block.resnets.0.conv1.weight"])
    for path in (tmp_path / "donor", tmp_path / "donor" / "vae", tmp_path / "vae.safetensors"):
        got = load_vae(path, base, torch.float32).state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items()), path
    model = load_model(ModelConfig(pretrained_model_name_or_path="tiny:sd15", vae=str(tmp_path / "vae.safetensors")),
                       dtype=torch.bfloat16)
    assert model.vae.dtype == torch.bfloat16
    assert torch.equal(model.vae.state_dict()["decoder.mid_block.resnets.0.conv1.weight"], expected["decoder.mid_block.resnets.0.conv1.weight"].bfloat16())
    with pytest.raises(ModelFileError, match="model.vae"):
        load_vae(tmp_path / "missing", base, torch.float32)


def test_model_config_validation():
    ModelConfig().validate()
    with pytest.raises(ConfigError, match="v_parameterization = true conflicts with model.prediction_type"):
        ModelConfig(v_parameterization=True, prediction_type="epsilon").validate()
    with pytest.raises(ConfigError, match="model.clip_skip"):
        ModelConfig(clip_skip=0).validate()
    with pytest.raises(ConfigError, match="pretrained_model_name_or_path is empty"):
        ModelConfig(pretrained_model_name_or_path=" ").validate()
    assert ModelConfig(v_parameterization=True).resolved_prediction_type() == "v_prediction"
    assert ModelConfig().resolved_prediction_type() is None and ModelConfig(family="sd2").resolved_family() == "sd2"
