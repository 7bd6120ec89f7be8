"""SD3 / SD3.5 single files: the released key layout (full size, meta device), strictness, round trips, interop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from library.config.model import ModelConfig
from library.errors import ModelFileError
from library.models.configs import bundled_config_dir
from library.models.sd3 import keymaps as km
from library.models.sd3.single_file import load_sd3_tensors, model_to_sd3_file, save_sd3_single_file


class FakeFile(dict):
    """A TensorFile stand-in over meta tensors: key -> tensor, `.shapes`, `.metadata`, `.path`."""

    def __init__(self, tensors, path="meta.safetensors"):
        super().__init__(tensors)
        self.shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        self.metadata, self.path = {}, Path(path)


def _meta_model(name: str, with_t5: bool = True):
    """A full-size model of a bundled variant, every parameter on the meta device, as an SDModel."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from library.models.model import SDModel

    d = bundled_config_dir(name)
    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(d / "transformer"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(d / "vae"))
        tes = [CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(d / s)) for s in ("text_encoder", "text_encoder_2")]
        if with_t5:
            tes.append(T5EncoderModel(T5Config.from_pretrained(d / "text_encoder_3")))
    return SDModel("sd3", "flow", transformer, vae, tes, [], {}, name, d)


@pytest.fixture(scope="module")
def t5_tokenizer_dir(tmp_path_factory):
    from library.models.sd3.tiny import tiny_t5_tokenizer

    d = tmp_path_factory.mktemp("t5tok")
    tiny_t5_tokenizer().save_pretrained(d)
    return d


@pytest.mark.slow  # full-size layouts on the meta device: 10-80 s on 2 shared cores
@pytest.mark.parametrize("name", ["sd3_medium", "sd35_medium", "sd35_large"])
def test_our_file_layout_is_what_diffusers_converts(name):
    """Independent check of the MMDiT map: diffusers' own converter (single_file_utils) turns the file we would write
    back into exactly our state dict (every key consumed, same shapes), including the fused q/k/v and the swapped
    adaLN halves (checked by value on a small stand-in below)."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    model = _meta_model(name, with_t5=False)
    ours = model.unet.state_dict()
    file = {k: v for k, v in model_to_sd3_file(model).items() if k.startswith(km.MMDIT_PREFIX)}
    # The released key names we know independently of our map (diffusers' model detection keys).
    assert "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias" in file
    assert ("model.diffusion_model.joint_blocks.37.x_block.mlp.fc1.weight" in file) == (name == "sd35_large")
    assert file["model.diffusion_model.pos_embed"].shape[1] == {"sd3_medium": 36864, "sd35_medium": 147456,
                                                                "sd35_large": 36864}[name]
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(file))
    assert converted.keys() == ours.keys()
    assert all(tuple(converted[k].shape) == tuple(ours[k].shape) for k in ours)


def test_swapped_and_fused_tensors_match_diffusers_by_value():
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from library.models.sd3.tiny import tiny_transformer_config

    torch.manual_seed(0)
    t = SD3Transformer2DModel.from_config(tiny_transformer_config())
    sd = t.state_dict()
    file = km.to_file(sd, km.mmdit_keymap(t.config, sd.keys()))
    back = convert_sd3_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in file.items()})
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    last = t.config.num_layers - 1
    w = sd[f"transformer_blocks.{last}.norm1_context.linear.weight"]
    stored = file[f"model.diffusion_model.joint_blocks.{last}.context_block.adaLN_modulation.1.weight"]
    assert torch.equal(stored[: w.shape[0] // 2], w[w.shape[0] // 2:])  # (shift, scale) in the file


@pytest.mark.slow  # full-size layouts on the meta device: 10-80 s on 2 shared cores
@pytest.mark.parametrize("name", ["sd3_medium", "sd35_medium", "sd35_large"])
def test_full_size_single_file_loads_on_meta_and_round_trips(name, t5_tokenizer_dir):
    model = _meta_model(name)
    file = FakeFile(model_to_sd3_file(model))
    assert sum(k.startswith(km.T5_PREFIX) for k in file) == 219  # shared + 218 encoder tensors, no tied copy
    loaded = load_sd3_tensors(file, ModelConfig(pretrained_model_name_or_path="x", t5_tokenizer=str(t5_tokenizer_dir)))
    assert loaded.extra["sd3_variant"] == name and loaded.config_dir == bundled_config_dir(name)
    assert len(loaded.text_encoders) == 3 and loaded.unet.device.type == "meta"
    again = model_to_sd3_file(loaded)
    assert list(again) == list(file) and all(tuple(again[k].shape) == file.shapes[k] for k in file)


def test_full_size_file_without_text_encoders_needs_them_or_drops_t5(tmp_path):
    model = _meta_model("sd35_large")
    file = FakeFile({k: v for k, v in model_to_sd3_file(model).items() if not k.startswith(km.TE_PREFIXES)})
    with pytest.raises(ModelFileError, match="holds no clip_l text encoder .*model.clip_l"):
        load_sd3_tensors(file, ModelConfig(pretrained_model_name_or_path="x", use_t5=False))


@pytest.mark.slow  # full-size layouts on the meta device: 10-80 s on 2 shared cores
def test_unknown_missing_and_misshaped_keys_fail_loudly(t5_tokenizer_dir):
    base = model_to_sd3_file(_meta_model("sd35_medium"))
    cfg = ModelConfig(pretrained_model_name_or_path="x", t5_tokenizer=str(t5_tokenizer_dir))
    stray = dict(base, **{"model.diffusion_model.joint_blocks.0.x_block.attn.extra.weight": torch.empty(1, device="meta")})
    with pytest.raises(ModelFileError, match="unexpected key 'model.diffusion_model.joint_blocks.0.x_block.attn.extra"):
        load_sd3_tensors(FakeFile(stray), cfg)
    outside = dict(base, **{"cond_stage_model.foo": torch.empty(1, device="meta")})
    with pytest.raises(ModelFileError, match="unexpected key 'cond_stage_model.foo'"):
        load_sd3_tensors(FakeFile(outside), cfg)
    te_stray = dict(base, **{km.CLIP_G_PREFIX + "text_model.bogus.weight": torch.empty(1, device="meta")})
    with pytest.raises(ModelFileError, match="unexpected key 'text_encoders.clip_g.transformer.text_model.bogus"):
        load_sd3_tensors(FakeFile(te_stray), cfg)
    missing = {k: v for k, v in base.items() if k != "model.diffusion_model.final_layer.linear.bias"}
    with pytest.raises(ModelFileError, match="missing key 'model.diffusion_model.final_layer.linear.bias'"):
        load_sd3_tensors(FakeFile(missing), cfg)
    bad = dict(base)
    bad["model.diffusion_model.context_embedder.weight"] = torch.empty(1536, 2048, device="meta")
    with pytest.raises(ModelFileError, match="context_embedder.weight' has shape \\[1536, 2048\\]"):
        load_sd3_tensors(FakeFile(bad), cfg)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from library.models.tiny import build_tiny

    return build_tiny("sd3", seed=3)


def _tiny_cfg(path, tiny, **kw):
    return ModelConfig(pretrained_model_name_or_path=str(path), config_dir=str(tiny.config_dir), **kw)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_single_file_round_trip(tmp_path, tiny):
    from safetensors import safe_open

    from library.models.load import load_model

    path = tmp_path / "sd3.safetensors"
    save_sd3_single_file(tiny, path, dtype=torch.float32)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-3-5-medium"
        keys = set(f.keys())
    assert keys == set(model_to_sd3_file(tiny))
    loaded = load_model(_tiny_cfg(path, tiny))
    assert loaded.family == "sd3" and len(loaded.text_encoders) == 3
    for a, b in zip((tiny.unet, tiny.vae, *tiny.text_encoders), (loaded.unet, loaded.vae, *loaded.text_encoders)):
        assert _same_weights(a, b)
    t5 = loaded.text_encoders[2]
    assert t5.encoder.embed_tokens.weight is t5.shared.weight  # tied again after assignment
    save_sd3_single_file(loaded, tmp_path / "again.safetensors", dtype=torch.float32)
    with safe_open(str(tmp_path / "again.safetensors"), "pt") as f:
        assert set(f.keys()) == keys


@pytest.mark.parametrize("name, kw, error, message", [
    ("m.ckpt", {}, ModelFileError, r"m\.ckpt: single files are written as \.safetensors only \(never pickles\)"),
    ("m.safetensors", {"dtype": torch.float64}, ValueError, r"save dtype must be float32, float16 or bfloat16"),
    ("m.safetensors", {"metadata": {"steps": 10}}, TypeError, r"metadata must map str to str; bad entry 'steps'"),
])
def test_save_refuses_what_every_family_refuses_before_writing(tmp_path, tiny, name, kw, error, message):
    """SD3 goes through the same single-file writer as SD1 / SD2 / SDXL (library/models/single_file_write.py)."""
    from library.models.single_file import save_single_file

    with pytest.raises(error, match=message):
        save_single_file(tiny, tmp_path / name, **kw)
    assert list(tmp_path.iterdir()) == []


def test_tiny_single_file_with_separate_text_encoder_files(tmp_path, tiny):
    from safetensors.torch import save_file

    from library.models.load import load_model
    from library.models.sd3.text_encoders import our_state_dict

    full = model_to_sd3_file(tiny)
    core = {k: v.contiguous() for k, v in full.items() if not k.startswith(km.TE_PREFIXES)}
    save_file(core, tmp_path / "sd3_core.safetensors")
    files = {}
    for name, te in zip(("clip_l", "clip_g", "t5xxl"), tiny.text_encoders):
        files[name] = tmp_path / f"{name}.safetensors"
        sd = {k: v.contiguous() for k, v in our_state_dict(te, name).items()}
        if name == "clip_l":  # some released clip_l files lack the projection: identity, as sd-scripts does
            sd.pop("text_projection.weight")
        if name == "clip_g":  # with the single file's prefix
            sd = {km.CLIP_G_PREFIX + k: v for k, v in sd.items()}
        save_file(sd, files[name])
    loaded = load_model(_tiny_cfg(tmp_path / "sd3_core.safetensors", tiny, **{k: str(v) for k, v in files.items()}))
    assert _same_weights(tiny.text_encoders[1], loaded.text_encoders[1])
    assert _same_weights(tiny.text_encoders[2], loaded.text_encoders[2])
    proj = loaded.text_encoders[0].text_projection.weight
    assert torch.equal(proj, torch.eye(proj.shape[0]))
    no_t5 = load_model(_tiny_cfg(tmp_path / "sd3_core.safetensors", tiny, clip_l=str(files["clip_l"]),
                                 clip_g=str(files["clip_g"]), use_t5=False))
    assert len(no_t5.text_encoders) == 2 and len(no_t5.tokenizers) == 2
    # A file with both CLIPs and no T5, and no model.t5xxl: T5 is not used (there is nothing to read it from).
    part = {k: v.contiguous() for k, v in full.items() if not k.startswith(km.T5_PREFIX)}
    save_file(part, tmp_path / "no_t5.safetensors")
    assert len(load_model(_tiny_cfg(tmp_path / "no_t5.safetensors", tiny)).text_encoders) == 2
    wrong = tmp_path / "wrong.safetensors"
    save_file({"encoder.block.0.layer.0.SelfAttention.q.scale_weight": torch.ones(1)}, wrong)
    with pytest.raises(ModelFileError, match="model.t5xxl: .*unexpected key 'encoder.block.0.layer.0.SelfAttention.q"):
        load_model(_tiny_cfg(tmp_path / "sd3_core.safetensors", tiny, clip_l=str(files["clip_l"]),
                             clip_g=str(files["clip_g"]), t5xxl=str(wrong)))


def test_diffusers_reads_our_single_file(tmp_path, tiny):
    """diffusers' from_single_file (with our config folder, offline) reads the transformer and VAE we write."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    path = tmp_path / "sd3.safetensors"
    save_sd3_single_file(tiny, path, dtype=torch.float32)
    t = SD3Transformer2DModel.from_single_file(str(path), config=str(tiny.config_dir), subfolder="transformer",
                                               local_files_only=True, torch_dtype=torch.float32)
    assert _same_weights(tiny.unet, t)
    v = AutoencoderKL.from_single_file(str(path), config=str(tiny.config_dir), subfolder="vae",
                                       local_files_only=True, torch_dtype=torch.float32)
    assert _same_weights(tiny.vae, v)
